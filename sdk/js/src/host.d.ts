// Types of the `host` interface of lockstep:connector@0.2.0 as componentize-js exposes it
// (wit/connector.wit); the import is resolved when the component is built.
declare module "lockstep:connector/host@0.2.0" {
  export type Level = "trace" | "debug" | "info" | "warn" | "error";
  export function log(level: Level, message: string): void;
  export function configGet(key: string): string | undefined;
  export function cacheGet(key: string): string | undefined;
  export function cacheSet(key: string, value: string, ttlMs: bigint): void;
}
