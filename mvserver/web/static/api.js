// Shared by the pages: one call to the API, and its error shape as an exception.

export class RequestFailed extends Error {
  constructor(error, status) {
    super(error.message);
    this.error = error; // {code, message, field?, provider?, provider_status?, provider_error?}
    this.status = status;
  }
}

// A JSON call (a Blob or FormData body is sent as it is): {body, response} on success, else RequestFailed carrying
// the server's error (or a network_error / http_error of our own when there is none).
export async function callApi(method, url, body, headers = {}) {
  const options = { method, headers: { Accept: "application/json", ...headers } };
  if (body instanceof Blob || body instanceof FormData) {
    options.body = body;
  } else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new RequestFailed({ code: "network_error", message: `could not reach the server: ${err.message}` }, 0);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const error = payload && payload.error ? payload.error
      : { code: "http_error", message: `${response.status} ${response.statusText}` };
    throw new RequestFailed(error, response.status);
  }
  return { body: payload, response };
}

export function asError(err) {
  return err instanceof RequestFailed ? err.error : { code: "client_error", message: String(err && err.message || err) };
}
