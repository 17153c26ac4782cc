// Starts Swagger UI on /docs. It is a file of its own rather than an inline <script> so that the
// page's Content-Security-Policy can allow scripts from the service only (script-src 'self'),
// and it reads the schema URL from a data- attribute the server writes, so no value is ever
// spliced into JavaScript.
(function () {
  "use strict";

  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    domNode: root,
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // Tokens live in this page's memory only: nothing is written to localStorage, so a token
    // does not outlive the tab or leak to the next person at a shared machine.
    persistAuthorization: false,
    // No badge fetched from validator.swagger.io: the page talks to its own origin only.
    validatorUrl: null,
    // No ?url= / ?configUrl= from the address bar: the page shows this service's schema only.
    queryConfigEnabled: false,
  });
})();
