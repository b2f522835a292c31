import type { components } from "./generated/openapi.js";

/** The service's one error shape, `{"error": {...}}`: HTTP errors and a job's `error` alike. */
export type ErrorBody = components["schemas"]["Error"]["error"];

/** Statuses after which the same request may succeed later (the server refused it before doing the work, or the
 * connection failed). 0 is "no answer" (network error). */
const TRANSIENT = new Set([0, 408, 429, 502, 503, 504]);

/**
 * A failed call: the HTTP status and the server's error object, flattened so a page can branch on `code`, show
 * `message`, highlight `field` and put the provider fields in a details area. `status` is 0 (code
 * `network_error`) when no answer came back at all.
 */
export class MvApiError extends Error {
  override readonly name = "MvApiError";
  /** HTTP status; 0 when the server could not be reached or the connection broke. */
  readonly status: number;
  readonly code: string;
  readonly field: string | undefined;
  readonly provider: string | undefined;
  readonly providerStatus: number | string | undefined;
  readonly providerError: unknown;
  /** Seconds to wait before trying again, from `Retry-After` (429, 503, 409 idempotency_in_progress). */
  readonly retryAfter: number | undefined;
  /** The server's `X-Request-Id` of the failed call, to find it in the server's logs. */
  readonly requestId: string | undefined;
  /** The error object as the server sent it. */
  readonly body: ErrorBody;

  constructor(status: number, body: ErrorBody, options: { retryAfter?: number | undefined;
    requestId?: string | undefined; cause?: unknown } = {}) {
    super(body.message, options.cause === undefined ? undefined : { cause: options.cause });
    this.status = status;
    this.body = body;
    this.code = body.code;
    this.field = body.field;
    this.provider = body.provider;
    this.providerStatus = body.provider_status;
    this.providerError = body.provider_error;
    this.retryAfter = options.retryAfter;
    this.requestId = options.requestId;
  }

  /** True when repeating the same request later may succeed (network error, 408, 429, 502, 503, 504, or 409
   * idempotency_in_progress). Whether it is *safe* to repeat depends on the request (see the retry policy). */
  get transient(): boolean {
    return TRANSIENT.has(this.status) || this.code === "idempotency_in_progress";
  }

  /** The error of an answer whose body was already read (openapi-fetch parses it as JSON when it can). */
  static fromAnswer(response: Response, parsed: unknown): MvApiError {
    const options = { retryAfter: parseRetryAfter(response.headers.get("Retry-After")),
      requestId: response.headers.get("X-Request-Id") ?? undefined };
    return new MvApiError(response.status, errorBody(parsed, response), options);
  }

  /** The error of an answer whose body has not been read yet. */
  static async fromResponse(response: Response): Promise<MvApiError> {
    const text = await response.text().catch(() => "");
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON: a proxy's page, say; errorBody() describes it by its status
    }
    return MvApiError.fromAnswer(response, parsed);
  }

  /** No answer: the server was unreachable or the connection broke (`status` 0, as in the client notes). */
  static network(cause: unknown, what = "server unreachable"): MvApiError {
    const reason = cause instanceof Error ? cause.message : String(cause);
    return new MvApiError(0, { code: "network_error", message: `${what}: ${reason}` }, { cause });
  }
}

function errorBody(parsed: unknown, response: Response): ErrorBody {
  if (typeof parsed === "object" && parsed !== null && "error" in parsed) {
    const error = (parsed as { error: unknown }).error;
    if (typeof error === "object" && error !== null && typeof (error as { code?: unknown }).code === "string") {
      const body = error as ErrorBody;
      return { ...body, message: typeof body.message === "string" ? body.message : body.code };
    }
  }
  return { code: "http_error", message: `${response.status} ${response.statusText}`.trim() };
}

/** `Retry-After` as seconds: delta-seconds, or an HTTP date (then the time left until it, at least 0). */
export function parseRetryAfter(value: string | null): number | undefined {
  if (value === null || value.trim() === "") return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const date = Date.parse(text);
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}
