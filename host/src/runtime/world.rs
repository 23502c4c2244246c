//! The `lockstep:connector` versions the host serves, which one a component targets, and the
//! hook call for each: the event conversion is written once per version (0.2.0 adds
//! `expires-at`), and a version only gets the events it has a hook for (`refresh` needs
//! 0.2.0).

use wasmtime::component::{Component, InstancePre};
use wasmtime::{Result as WasmResult, Store};

use super::HookFailure;
use super::bindings::{v0_1_0, v0_2_0, v0_3_0};
use super::sandbox::CallState;
use crate::domain::{EventType, SessionKind, SyncEvent};

/// A version of the `lockstep:connector` world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum World {
    /// `lockstep:connector@0.1.0`: on-login, on-logout, revoke. Frozen.
    V0_1_0,
    /// `lockstep:connector@0.2.0`: 0.1.0 plus on-refresh and `expires-at`.
    V0_2_0,
    /// `lockstep:connector@0.3.0`: 0.2.0 plus the `signing` interface (signed events).
    V0_3_0,
}

impl World {
    /// Every version the host loads, newest first (the order in which a component's exports
    /// are matched).
    pub const SUPPORTED: [World; 3] = [World::V0_3_0, World::V0_2_0, World::V0_1_0];

    /// The package with its version, e.g. `lockstep:connector@0.2.0`.
    pub fn package(self) -> &'static str {
        match self {
            World::V0_1_0 => "lockstep:connector@0.1.0",
            World::V0_2_0 => "lockstep:connector@0.2.0",
            World::V0_3_0 => "lockstep:connector@0.3.0",
        }
    }

    /// The name under which a component of this version exports its hooks.
    pub fn hooks_export(self) -> &'static str {
        match self {
            World::V0_1_0 => "lockstep:connector/hooks@0.1.0",
            World::V0_2_0 => "lockstep:connector/hooks@0.2.0",
            World::V0_3_0 => "lockstep:connector/hooks@0.3.0",
        }
    }

    /// Whether this version has a hook for `event_type`.
    pub fn has_hook(self, event_type: EventType) -> bool {
        match event_type {
            EventType::Login | EventType::Logout | EventType::Revoke => true,
            EventType::Refresh => self != World::V0_1_0,
        }
    }

    /// The WIT name of the hook that handles `event_type` (the same in every version), for
    /// spans and logs.
    pub fn hook_name(event_type: EventType) -> &'static str {
        match event_type {
            EventType::Login => "on-login",
            EventType::Logout => "on-logout",
            EventType::Revoke => "revoke",
            EventType::Refresh => "on-refresh",
        }
    }

    /// The newest version whose hooks `component` exports, if any.
    pub fn of(component: &Component) -> Option<World> {
        World::SUPPORTED
            .into_iter()
            .find(|w| component.get_export_index(None, w.hooks_export()).is_some())
    }

    /// `lockstep:connector@0.2.0 or lockstep:connector@0.1.0`, for messages.
    pub fn supported_list() -> String {
        World::SUPPORTED.map(World::package).join(" or ")
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.package())
    }
}

/// A component pre-instantiated against the world it targets.
#[derive(Clone)]
pub(super) enum Hooks {
    V0_1_0(v0_1_0::ConnectorCorePre<CallState>),
    V0_2_0(v0_2_0::ConnectorCorePre<CallState>),
    V0_3_0(v0_3_0::ConnectorCorePre<CallState>),
}

impl Hooks {
    /// Checks that the pre-instantiated component exports `world`'s hooks with the right types.
    pub(super) fn new(world: World, pre: InstancePre<CallState>) -> WasmResult<Self> {
        Ok(match world {
            World::V0_1_0 => Hooks::V0_1_0(v0_1_0::ConnectorCorePre::new(pre)?),
            World::V0_2_0 => Hooks::V0_2_0(v0_2_0::ConnectorCorePre::new(pre)?),
            World::V0_3_0 => Hooks::V0_3_0(v0_3_0::ConnectorCorePre::new(pre)?),
        })
    }

    /// Instantiates the component in `store`, calling no hook (the load-time check, and the
    /// instance a call, or a run of calls of a `reuse_instance` connector, is served from).
    pub(super) async fn instantiate(&self, store: &mut Store<CallState>) -> WasmResult<Instance> {
        Ok(match self {
            Hooks::V0_1_0(pre) => Instance::V0_1_0(pre.instantiate_async(store).await?),
            Hooks::V0_2_0(pre) => Instance::V0_2_0(pre.instantiate_async(store).await?),
            Hooks::V0_3_0(pre) => Instance::V0_3_0(pre.instantiate_async(store).await?),
        })
    }
}

/// The hook call of a version that has every hook (0.2.0 on): the generated modules differ
/// in their types only, so the macro writes the same call for each.
macro_rules! call_every_hook {
    ($v:ident, $to_wit:ident, $hooks:ident, $instance:expr, $store:expr, $event:expr) => {{
        use $v::HookError;
        let wit_event = $to_wit($event);
        let hooks = $instance.$hooks();
        let answer = match $event.event_type {
            EventType::Login => hooks.call_on_login(&mut *$store, &wit_event).await?,
            EventType::Logout => hooks.call_on_logout(&mut *$store, &wit_event).await?,
            EventType::Revoke => hooks.call_revoke(&mut *$store, &wit_event).await?,
            EventType::Refresh => hooks.call_on_refresh(&mut *$store, &wit_event).await?,
        };
        Ok(answer.map_err(|e| match e {
            HookError::Retry(m) => HookFailure::Retry(m),
            HookError::Fail(m) => HookFailure::Fail(m),
        }))
    }};
}

/// An instance of a connector, of the version it targets.
pub(super) enum Instance {
    V0_1_0(v0_1_0::ConnectorCore),
    V0_2_0(v0_2_0::ConnectorCore),
    V0_3_0(v0_3_0::ConnectorCore),
}

impl Instance {
    /// Calls the hook of `event`. The outer error is a trap; the inner one is the connector's
    /// own answer.
    pub(super) async fn call(
        &self,
        store: &mut Store<CallState>,
        event: &SyncEvent,
    ) -> WasmResult<Result<(), HookFailure>> {
        match self {
            Instance::V0_1_0(instance) => {
                use v0_1_0::HookError;
                let wit_event = to_wit_v0_1_0(event);
                let hooks = instance.lockstep_connector0_1_0_hooks();
                let answer = match event.event_type {
                    EventType::Login => hooks.call_on_login(&mut *store, &wit_event).await?,
                    EventType::Logout => hooks.call_on_logout(&mut *store, &wit_event).await?,
                    EventType::Revoke => hooks.call_revoke(&mut *store, &wit_event).await?,
                    // Not routed: a 0.1.0 component subscribing to refresh is refused at load.
                    EventType::Refresh => {
                        return Ok(Err(HookFailure::Fail(format!(
                            "refresh needs {}; this component targets {}",
                            World::V0_2_0,
                            World::V0_1_0
                        ))));
                    }
                };
                Ok(answer.map_err(|e| match e {
                    HookError::Retry(m) => HookFailure::Retry(m),
                    HookError::Fail(m) => HookFailure::Fail(m),
                }))
            }
            Instance::V0_2_0(instance) => {
                call_every_hook!(
                    v0_2_0,
                    to_wit_v0_2_0,
                    lockstep_connector0_2_0_hooks,
                    instance,
                    store,
                    event
                )
            }
            Instance::V0_3_0(instance) => {
                call_every_hook!(
                    v0_3_0,
                    to_wit_v0_3_0,
                    lockstep_connector0_3_0_hooks,
                    instance,
                    store,
                    event
                )
            }
        }
    }
}

fn rfc3339(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The `session-event` record of the version module `$v`, from a [`SyncEvent`]: the fields
/// every version has, plus the given ones.
macro_rules! session_event {
    ($v:ident, $e:expr $(, $field:ident: $value:expr)* $(,)?) => {{
        let e: &SyncEvent = $e;
        $v::SessionEvent {
            event_id: e.event_id.clone(),
            event_type: match e.event_type {
                EventType::Login => $v::EventType::Login,
                EventType::Logout => $v::EventType::Logout,
                EventType::Revoke => $v::EventType::Revoke,
                EventType::Refresh => $v::EventType::Refresh,
            },
            realm: e.realm.clone(),
            external_id: e.external_id.clone(),
            kind: match e.kind {
                SessionKind::Parent => $v::SessionKind::Parent,
                SessionKind::Child => $v::SessionKind::Child,
                SessionKind::Fixed => $v::SessionKind::Fixed,
            },
            idp_session_id: e.idp_session_id.clone(),
            idp_client_session_id: e.idp_client_session_id.clone(),
            user_id: e.user_id.clone(),
            system: e.system.clone(),
            origin_system: e.origin_system.clone(),
            end_reason: e.end_reason.map(|r| r.as_str().to_owned()),
            attributes: e
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            occurred_at: rfc3339(&e.occurred_at),
            $($field: $value,)*
        }
    }};
}

fn to_wit_v0_1_0(e: &SyncEvent) -> v0_1_0::SessionEvent {
    session_event!(v0_1_0, e)
}

fn to_wit_v0_2_0(e: &SyncEvent) -> v0_2_0::SessionEvent {
    session_event!(v0_2_0, e, expires_at: e.expires_at.as_ref().map(rfc3339))
}

fn to_wit_v0_3_0(e: &SyncEvent) -> v0_3_0::SessionEvent {
    session_event!(v0_3_0, e, expires_at: e.expires_at.as_ref().map(rfc3339))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_has_a_hook_from_0_2_0_on() {
        for t in [EventType::Login, EventType::Logout, EventType::Revoke] {
            assert!(World::V0_1_0.has_hook(t) && World::V0_2_0.has_hook(t));
        }
        assert!(!World::V0_1_0.has_hook(EventType::Refresh));
        assert!(World::V0_2_0.has_hook(EventType::Refresh));
        assert!(World::V0_3_0.has_hook(EventType::Refresh));
        assert_eq!(
            World::supported_list(),
            "lockstep:connector@0.3.0 or lockstep:connector@0.2.0 or lockstep:connector@0.1.0"
        );
    }
}
