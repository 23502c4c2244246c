"""schemathesis hooks of scripts/fuzz-api.sh: two input rules that JSON Schema cannot state.

Both are enforced by the server (400 VALIDATION) and tested in host/tests (external_sessions.rs,
proptest_api.rs). A generator that only knows the schema produces inputs breaking them, which
the `positive_data_acceptance` check would then report as "schema-valid request rejected".
Rather than dropping that check, the request is adjusted just before it is sent (`before_call`
runs in every phase, after stateful links have filled in values), so that it keeps every
property the generator gave it except the one the schema cannot express:

- map-child naming the child as its own parent (a rule between two fields): the child's id
  gets a different last character (same length, still valid or invalid as generated);
- more than 8 KiB of attribute keys and values on one session (a rule over the sum of a map):
  entries are dropped, largest first, until the rest fits (the schema sets no minimum).
"""

import schemathesis

BASE = "/admin/realms/{realm}/external-sessions"
MAP_PATHS = {f"{BASE}/map-parent", f"{BASE}/map-child", f"{BASE}/map-fixed"}
MAX_ATTRIBUTES_BYTES = 8 * 1024  # sync/validate.rs MAX_ATTRIBUTES_BYTES


def _size(attributes):
    return sum(
        len(str(k).encode()) + (len(v.encode()) if isinstance(v, str) else 0)
        for k, v in attributes.items()
    )


@schemathesis.hook
def before_call(context, case, kwargs):
    operation = context.operation
    if operation is None or operation.path not in MAP_PATHS or not isinstance(case.body, dict):
        return
    body = dict(case.body)
    child, parent = body.get("externalId"), body.get("parentExternalId")
    if operation.path.endswith("/map-child") and isinstance(child, str) and child and child == parent:
        body["externalId"] = child[:-1] + ("~" if child[-1] != "~" else "-")
    attributes = body.get("attributes")
    if isinstance(attributes, dict) and _size(attributes) > MAX_ATTRIBUTES_BYTES:
        kept = dict(attributes)
        for key in sorted(kept, key=lambda k: -_size({k: kept[k]})):
            if _size(kept) <= MAX_ATTRIBUTES_BYTES:
                break
            del kept[key]
        body["attributes"] = kept
    if body != case.body:
        case.body = body


# A Security Event Token is a compact JWS: text on the wire. No generated string is a SET
# signed by a configured transmitter (the fuzzed server has none), so every push is refused;
# the body only has to reach the server.
schemathesis.serializer.alias("application/secevent+jwt", "text/plain")
