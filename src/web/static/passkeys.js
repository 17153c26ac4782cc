// Passkeys on the hosted pages (docs/passkeys.md). Loaded from /assets only by the pages that
// need it; their policy allows this origin's scripts and requests, nothing inline.
//
// It drives the forms marked data-passkey:
//   "register": POST {password, name} to data-options-url, navigator.credentials.create(),
//               POST {name, credential, challenge_token} to the form's action;
//   "signin":   POST {ticket?} to data-options-url, navigator.credentials.get(),
//               POST {credential, challenge_token, authz, ticket?} to the form's action, then
//               go where the answer says ({"redirect": url}).
// Every request carries the form's CSRF token in X-CSRF-Token. Without this script (or without
// WebAuthn) the forms stay hidden and the [data-passkey-unsupported] text says why.
"use strict";

(() => {
  const supported =
    typeof window.PublicKeyCredential === "function" &&
    typeof navigator.credentials === "object" &&
    typeof navigator.credentials.create === "function";
  const GENERIC = "Something went wrong. Reload the page and try again.";

  class Refused extends Error {}

  function toBytes(base64url) {
    const base64 = base64url.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const binary = atob(padded);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) {
      bytes[i] = binary.charCodeAt(i);
    }
    return bytes.buffer;
  }

  function toBase64url(buffer) {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 1) {
      binary += String.fromCharCode(bytes[i]);
    }
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map((item) => ({ ...item, id: toBytes(item.id) }));
  }

  function creationOptions(json) {
    return {
      ...json,
      challenge: toBytes(json.challenge),
      user: { ...json.user, id: toBytes(json.user.id) },
      excludeCredentials: descriptors(json.excludeCredentials),
    };
  }

  function requestOptions(json) {
    return {
      ...json,
      challenge: toBytes(json.challenge),
      allowCredentials: descriptors(json.allowCredentials),
    };
  }

  function registrationJSON(credential) {
    const response = credential.response;
    return {
      id: credential.id,
      rawId: toBase64url(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || null,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: {
        clientDataJSON: toBase64url(response.clientDataJSON),
        attestationObject: toBase64url(response.attestationObject),
        transports: typeof response.getTransports === "function" ? response.getTransports() : [],
      },
    };
  }

  function assertionJSON(credential) {
    const response = credential.response;
    return {
      id: credential.id,
      rawId: toBase64url(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || null,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: {
        clientDataJSON: toBase64url(response.clientDataJSON),
        authenticatorData: toBase64url(response.authenticatorData),
        signature: toBase64url(response.signature),
        userHandle: response.userHandle ? toBase64url(response.userHandle) : null,
      },
    };
  }

  async function post(url, csrf, body) {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        redirect: "error",
        headers: {
          Accept: "application/json",
          "Content-Type": "application/json",
          "X-CSRF-Token": csrf,
        },
        body: JSON.stringify(body),
      });
    } catch (error) {
      throw new Refused("The service could not be reached. Check your connection and try again.");
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (error) {
      answer = null;
    }
    if (!response.ok || answer === null || typeof answer !== "object") {
      const message = answer && typeof answer.error === "string" ? answer.error : GENERIC;
      throw new Refused(message);
    }
    return answer;
  }

  function field(form, name) {
    const input = form.elements.namedItem(name);
    return input && typeof input.value === "string" ? input.value : "";
  }

  function ceremonyMessage(error) {
    if (error instanceof Refused) {
      return error.message;
    }
    if (error && error.name === "NotAllowedError") {
      return "The passkey was not used (cancelled or timed out). Try again.";
    }
    if (error && error.name === "InvalidStateError") {
      return "This passkey is registered already.";
    }
    return GENERIC;
  }

  function showError(container, message) {
    if (!container) {
      return;
    }
    const text = container.querySelector("p") || container;
    text.textContent = message;
    container.hidden = false;
  }

  // Schemes that would run or show content in this page's place, never a redirect URI.
  const REFUSED_SCHEMES = ["javascript", "data", "vbscript", "blob", "file"];

  function goTo(url) {
    // A path of this service, or an application's redirect URI (https, or a native app's own
    // scheme), as the server answered.
    if (typeof url === "string") {
      const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url);
      if (
        /^\/(?!\/)/.test(url) ||
        (scheme && !REFUSED_SCHEMES.includes(scheme[1].toLowerCase()))
      ) {
        window.location.assign(url);
        return;
      }
    }
    throw new Refused(GENERIC);
  }

  async function register(form) {
    const csrf = field(form, "csrf_token");
    const name = field(form, "name");
    const start = await post(form.dataset.optionsUrl, csrf, {
      name,
      password: field(form, "password"),
    });
    const credential = await navigator.credentials.create({
      publicKey: creationOptions(start.options),
    });
    const done = await post(form.action, csrf, {
      name,
      credential: registrationJSON(credential),
      challenge_token: start.challenge_token,
    });
    const codes = Array.isArray(done.recovery_codes) ? done.recovery_codes : [];
    const panel = document.querySelector("[data-passkey-codes]");
    if (codes.length > 0 && panel) {
      // Shown once: the account's first second factor comes with recovery codes.
      const list = panel.querySelector("ol, ul");
      list.replaceChildren(
        ...codes.map((code) => {
          const item = document.createElement("li");
          item.textContent = code;
          return item;
        }),
      );
      const next = panel.querySelector("a[data-passkey-continue]");
      if (next && typeof done.redirect === "string" && /^\/(?!\/)/.test(done.redirect)) {
        next.href = done.redirect;
      }
      for (const element of document.querySelectorAll("[data-passkey-main]")) {
        element.hidden = true;
      }
      panel.hidden = false;
      panel.querySelector("h2, h3").focus();
      return;
    }
    goTo(done.redirect);
  }

  async function signIn(form) {
    const csrf = field(form, "csrf_token");
    const ticket = field(form, "ticket");
    const start = await post(form.dataset.optionsUrl, csrf, ticket ? { ticket } : {});
    const credential = await navigator.credentials.get({
      publicKey: requestOptions(start.options),
    });
    const body = {
      credential: assertionJSON(credential),
      challenge_token: start.challenge_token,
      authz: field(form, "authz"),
    };
    if (ticket) {
      body.ticket = ticket;
    }
    const done = await post(form.action, csrf, body);
    goTo(done.redirect);
  }

  const ceremonies = { register, signin: signIn };

  function setUp(form) {
    const ceremony = ceremonies[form.dataset.passkey];
    if (!ceremony) {
      return;
    }
    const scope = form.closest("[data-passkey-scope]") || document;
    const errors = scope.querySelector("[data-passkey-error]");
    const button = form.querySelector('button[type="submit"]');
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (form.dataset.busy === "true") {
        return;
      }
      form.dataset.busy = "true";
      if (button) {
        button.disabled = true;
      }
      if (errors) {
        errors.hidden = true;
      }
      try {
        await ceremony(form);
      } catch (error) {
        showError(errors, ceremonyMessage(error));
      } finally {
        form.dataset.busy = "false";
        if (button) {
          button.disabled = false;
        }
      }
    });
  }

  function start() {
    if (!supported) {
      return;
    }
    for (const element of document.querySelectorAll("[data-passkey-unsupported]")) {
      element.hidden = true;
    }
    for (const element of document.querySelectorAll("[data-passkey-enabled]")) {
      element.hidden = false;
    }
    for (const form of document.querySelectorAll("form[data-passkey]")) {
      setUp(form);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
