"""Example connector (Python): mirrors Lockstep sessions into a legacy IAM system's session
table (tests/legacy-sim) behind its REST API and HTTP Basic auth. connectors/legacy-rust and
connectors/legacy-js do exactly the same.

- login: POST /api/v1/sessions; 201, or 409 (already there: delivery is at least once).
- logout: DELETE /api/v1/sessions/{externalId}; 204, or 404 (already gone).
- revoke: DELETE /api/v1/users/{userId}/sessions.
Network failures, 5xx, 408 and 429 ask for a retry; any other status fails.
Config: base_url, username, password (required).

A project made by `lockstep connector new --lang python` carries its own copy of the SDK
(lockstep.py); for this example `lockstep connector build` supplies the one it ships.
"""

from lockstep import Connector, basic_auth, config, http, log, path_segment


def _url(path):
    return config.require("base_url").rstrip("/") + path


def _auth():
    return {"authorization": basic_auth(config.require("username"), config.require("password"))}


def _expect(response, *ok):
    if response.status not in ok:
        raise response.error()


class Hooks(Connector):
    def on_login(self, event):
        response = http.request(
            "POST",
            _url("/api/v1/sessions"),
            headers=_auth(),
            json={
                "sessionId": event.external_id,
                "userId": event.user_id,
                "realm": event.realm,
                "idpSessionId": event.idp_session_id,
            },
        )
        _expect(response, 201, 409)
        log.info(f"created legacy session {event.external_id}")

    def on_logout(self, event):
        response = http.request(
            "DELETE", _url(f"/api/v1/sessions/{path_segment(event.external_id)}"), headers=_auth()
        )
        _expect(response, 204, 404)
        log.info(f"deleted legacy session {event.external_id}")

    def revoke(self, event):
        if event.user_id is None:
            return  # no user: nothing the legacy system can revoke
        response = http.request(
            "DELETE", _url(f"/api/v1/users/{path_segment(event.user_id)}/sessions"), headers=_auth()
        )
        if not 200 <= response.status < 300:
            raise response.error()
        log.info(f"revoked the legacy sessions of {event.user_id}")
