// REST calls with the bearer token, errors as {status, code, message}.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(getToken, onUnauthorized) {
    this.getToken = getToken;
    this.onUnauthorized = onUnauthorized;
  }

  async request(method, path, body, { retry = true } = {}) {
    const headers = { Authorization: `Bearer ${this.getToken()}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(0, "network", "chatd cannot be reached");
    }
    if (resp.status === 204) return null;
    const data = await resp.json().catch(() => null);
    if (resp.ok) return data;
    const error = (data && data.error) || { code: "error", message: resp.statusText };
    if (resp.status === 401 && retry && (await this.onUnauthorized())) {
      return this.request(method, path, body, { retry: false });
    }
    throw new ApiError(resp.status, error.code, error.message);
  }

  get(path) { return this.request("GET", path); }
  post(path, body) { return this.request("POST", path, body === undefined ? {} : body); }
  put(path, body) { return this.request("PUT", path, body === undefined ? {} : body); }
  patch(path, body) { return this.request("PATCH", path, body); }
  del(path) { return this.request("DELETE", path); }
}

export const enc = encodeURIComponent;

// Public endpoints, no token.
export async function publicJson(method, path, body) {
  const resp = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    const error = (data && data.error) || { code: "error", message: resp.statusText };
    throw new ApiError(resp.status, error.code, error.message);
  }
  return data;
}
