// Requests to the emoscope server: JSON calls, the server-sent-event stream of a chat
// completion, errors in the OpenAI shape, and the optional API key (this tab only).

const KEY = "emoscope.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(message, status = 0, param = null) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

function headers(extra = {}) {
  const out = { ...extra };
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param ?? null;
    } else if (body && body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401 && !apiKey()) message += " (enter the server's API key above)";
  return new ApiError(message, response.status, param);
}

export async function getJSON(path, signal) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function postJSON(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/**
 * POST a request whose answer is a server-sent-event stream and call onChunk with each
 * `data:` payload parsed as JSON, until `data: [DONE]` or the end of the stream.
 */
export async function postStream(path, body, onChunk, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  let data = [];

  // Returns true once the stream says it is done.
  const dispatch = () => {
    if (!data.length) return false;
    const payload = data.join("\n");
    data = [];
    if (payload.trim() === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(payload);
    } catch {
      throw new ApiError(`The server sent an unreadable event: ${payload.slice(0, 80)}`);
    }
    if (chunk && chunk.error) throw new ApiError(chunk.error.message || "stream error");
    onChunk(chunk);
    return false;
  };

  try {
    for (;;) {
      const { value, done } = await reader.read();
      pending += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = pending.split("\n");
      pending = done ? "" : lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (dispatch()) return;
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
        // comments (":") and other fields (event, id, retry) carry nothing here
      }
      if (done) {
        dispatch();
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}
