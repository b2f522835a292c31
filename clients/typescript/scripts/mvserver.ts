/**
 * Starts a private, sandboxed `python -m mvserver` (every provider answered by the built-in simulator) on a free
 * loopback port, for the tests and for `npm run generate`.
 *
 * Python is `MV_PYTHON` if set, else the repository's `.venv/bin/python` if it exists, else `python3`. The server
 * runs from the repository root (and with it first on PYTHONPATH), so it is this checkout's `mvserver` whatever
 * the venv has installed.
 */
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

export function pythonExecutable(): string {
  const fromEnv = process.env.MV_PYTHON?.trim();
  if (fromEnv) return fromEnv;
  const venv = join(REPO_ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export interface KeyLimitsOptions {
  jobsPerMinute?: number;
  jobsBurst?: number;
  blockingPerMinute?: number;
  blockingBurst?: number;
  maxRunningJobs?: number;
}

export interface ServerOptions {
  /** Turn API keys on and create one key with these limits (the defaults are generous). */
  keys?: KeyLimitsOptions | boolean;
  /** How long a simulated video takes (MV_SANDBOX_VIDEO_SECONDS); default 3. */
  videoSeconds?: number;
  /** Extra environment variables for the server. */
  env?: Record<string, string>;
}

export interface RunningServer {
  url: string;
  /** The API key created for this server (keys on only). */
  apiKey?: string;
  /** Everything the server printed so far. */
  log(): string;
  stop(): Promise<void>;
}

const PROVIDER_KEYS = ["GEMINI_API_KEY", "GOOGLE_API_KEY", "REPLICATE_API_TOKEN", "GOOGLE_VERTEX_API_KEY",
  "GOOGLE_CLOUD_PROJECT"];

function serverEnv(dir: string, options: ServerOptions): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith("MV_") && !name.startsWith("GOOGLE_") && !PROVIDER_KEYS.includes(name)) env[name] = value;
  }
  for (const name of PROVIDER_KEYS) env[name] = ""; // set and blank: a .env file cannot fill them in
  const pythonPath = [REPO_ROOT, process.env.PYTHONPATH].filter(Boolean).join(delimiter);
  return {
    ...env,
    PYTHONPATH: pythonPath,
    MV_SANDBOX: "1",
    MV_OUTPUT_DIR: join(dir, "outputs"),
    MV_SANDBOX_VIDEO_SECONDS: String(options.videoSeconds ?? 3),
    ...options.env,
  };
}

async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const address = probe.address();
      const port = typeof address === "object" && address ? address.port : 0;
      probe.close(() => resolvePort(port));
    });
  });
}

async function createKey(python: string, env: NodeJS.ProcessEnv, limits: KeyLimitsOptions): Promise<string> {
  const args = ["-m", "mvserver", "keys", "create", "client-tests",
    "--jobs-per-minute", String(limits.jobsPerMinute ?? 1000), "--jobs-burst", String(limits.jobsBurst ?? 100),
    "--blocking-per-minute", String(limits.blockingPerMinute ?? 1000),
    "--blocking-burst", String(limits.blockingBurst ?? 100),
    "--max-running-jobs", String(limits.maxRunningJobs ?? 50)];
  const { stdout } = await promisify(execFile)(python, args, { cwd: REPO_ROOT, env });
  const key = stdout.trim().split("\n").at(-1) ?? "";
  if (!key.startsWith("mv_")) throw new Error(`mvserver keys create printed no key:\n${stdout}`);
  return key;
}

async function waitHealthy(url: string, child: ChildProcess, log: () => string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) {
      throw new Error(`mvserver exited (${child.exitCode ?? child.signalCode}) before answering:\n${log()}`);
    }
    try {
      const response = await fetch(`${url}/api/mv/health`, { signal: AbortSignal.timeout(2000) });
      await response.body?.cancel();
      if (response.ok) return;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`mvserver did not answer within ${timeoutMs} ms:\n${log()}`);
    await new Promise((done) => setTimeout(done, 100));
  }
}

export async function startServer(options: ServerOptions = {}): Promise<RunningServer> {
  const python = pythonExecutable();
  const dir = await mkdtemp(join(tmpdir(), "mvserver-client-"));
  const env = serverEnv(dir, options);
  let apiKey: string | undefined;
  if (options.keys) {
    env.MV_API_KEYS_FILE = join(dir, "keys.yaml");
    env.MV_URL_SIGNING_SECRET = "client-tests-signing-secret-".padEnd(40, "x");
    apiKey = await createKey(python, env, options.keys === true ? {} : options.keys);
  }
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = spawn(python, ["-m", "mvserver", "--host", "127.0.0.1", "--port", String(port)],
    { cwd: REPO_ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  child.once("error", (error) => { output += `cannot run ${python}: ${error.message}\n`; });
  child.stdout?.on("data", (chunk: Buffer) => { output += chunk.toString(); });
  child.stderr?.on("data", (chunk: Buffer) => { output += chunk.toString(); });
  const exited = new Promise<void>((done) => { child.once("exit", () => done()); child.once("error", () => done()); });
  const stop = async (): Promise<void> => {
    if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 15_000);
      await exited;
      clearTimeout(timer);
    }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await waitHealthy(url, child, () => output, 60_000);
  } catch (error) {
    await stop();
    throw error;
  }
  return { url, apiKey, log: () => output, stop };
}
