"""The {{name}} connector: tells a legacy system about Lockstep session events.

A hook that returns succeeds; `raise Retry(msg)` when trying again can help (the peer is
down, timed out or answered 5xx), `raise Fail(msg)` when it cannot (bad configuration, 4xx).
Hooks you leave out do nothing. See lockstep.py for the SDK.
"""

from lockstep import Connector, config, http, log, path_segment


class Hooks(Connector):
    def on_login(self, event):
        response = http.request(
            "POST",
            f"{config.require('base_url')}/sessions",
            headers={"authorization": config.require("authorization")},
            json={
                "sessionId": event.external_id,
                "userId": event.user_id,
                "realm": event.realm,
                "idpSessionId": event.idp_session_id,
            },
        )
        if response.status not in (201, 409):  # 409: already there (at-least-once delivery)
            raise response.error()
        log.info(f"created legacy session {event.external_id}")

    def on_logout(self, event):
        response = http.request(
            "DELETE",
            f"{config.require('base_url')}/sessions/{path_segment(event.external_id)}",
            headers={"authorization": config.require("authorization")},
        )
        if response.status not in (204, 404):  # 404: already gone
            raise response.error()
        log.info(f"ended legacy session {event.external_id}")
