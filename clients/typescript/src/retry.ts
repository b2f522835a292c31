import { MvApiError } from "./errors.js";

export interface RetryPolicy {
  /** How many times a failed call is repeated (default 3; 0 turns retries off). */
  retries?: number;
  /** Wait before the first repeat when the answer has no `Retry-After` (default 500 ms, doubled each time). */
  backoffMs?: number;
  /** The longest `Retry-After` waited for (default 60 s); a longer one is thrown to the caller at once. */
  maxRetryAfterSeconds?: number;
}

/**
 * How safe a call is to repeat:
 * - `idempotent`: GET, DELETE, and a job-creating POST with an `Idempotency-Key` (the server answers a repeat with
 *   the first answer): any transient failure is repeated, a lost connection included.
 * - `refused`: any other POST (`create_scenes`, `generate_character_reference` are paid): repeated only when the
 *   server or provider refused it with 429 or 503, never after a lost connection, which may have done the work.
 */
export type RetryMode = "idempotent" | "refused";

export const DEFAULT_RETRY: Required<RetryPolicy> = { retries: 3, backoffMs: 500, maxRetryAfterSeconds: 60 };

function repeatable(error: MvApiError, mode: RetryMode): boolean {
  if (mode === "refused") return error.status === 429 || error.status === 503;
  return error.transient;
}

/** Run `call`, repeating it per `mode` and `policy`; waits `Retry-After` when the answer has one. */
export async function withRetries<T>(call: () => Promise<T>, mode: RetryMode, policy: RetryPolicy = {},
  signal?: AbortSignal): Promise<T> {
  const { retries, backoffMs, maxRetryAfterSeconds } = { ...DEFAULT_RETRY, ...policy };
  for (let attempt = 0; ; attempt++) {
    try {
      return await call();
    } catch (error) {
      if (!(error instanceof MvApiError) || attempt >= retries || !repeatable(error, mode)) throw error;
      if (error.retryAfter !== undefined && error.retryAfter > maxRetryAfterSeconds) throw error;
      const waitMs = error.retryAfter !== undefined ? error.retryAfter * 1000 : backoffMs * 2 ** attempt;
      await sleep(waitMs, signal);
    }
  }
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
