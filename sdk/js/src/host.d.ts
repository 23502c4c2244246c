// Types of the `host` and `signing` interfaces of lockstep:connector@0.3.0 as componentize-js
// exposes them (wit/connector.wit); the imports are resolved when the component is built.
declare module "lockstep:connector/host@0.3.0" {
  export type Level = "trace" | "debug" | "info" | "warn" | "error";
  export function log(level: Level, message: string): void;
  export function configGet(key: string): string | undefined;
  export function cacheGet(key: string): string | undefined;
  export function cacheSet(key: string, value: string, ttlMs: bigint): void;
}

declare module "lockstep:connector/signing@0.3.0" {
  /** Throws an error whose `payload` is the host's reason when nothing was signed. */
  export function signEvent(audience: string): string;
}
