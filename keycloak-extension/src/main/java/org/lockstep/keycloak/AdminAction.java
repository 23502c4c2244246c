package org.lockstep.keycloak;

/**
 * The admin events Lockstep cares about, recognised from what Keycloak 26.5.6 emits
 * (operation, resource type, resource path relative to {@code /admin/realms/{realm}/}):
 * <ul>
 * <li>{@code DELETE USER_SESSION sessions/{id}} (RealmAdminResource.deleteSession) → SESSION_DELETED</li>
 * <li>{@code ACTION USER users/{id}/logout} (UserResource.logout) → USER_LOGOUT_ALL</li>
 * <li>{@code ACTION REALM logout-all} (RealmAdminResource.logoutAll) → REALM_LOGOUT_ALL</li>
 * <li>{@code DELETE USER users/{id}} (UserResource.deleteUser) → USER_DELETED</li>
 * <li>{@code UPDATE USER users/{id}} (UserResource.updateUser) → USER_DISABLED, when the user
 *     is disabled after the update (decided by the caller)</li>
 * </ul>
 *
 * @param type the Lockstep type ({@code USER_UPDATED} stands for "check whether disabled")
 * @param id   the session or user id of the path, or null
 */
public record AdminAction(String type, String id) {

    public static final String USER_UPDATED = "USER_UPDATED";

    /** The action of an admin event, or null when Lockstep does not need it. */
    public static AdminAction of(String operation, String resourceType, String resourcePath) {
        if (operation == null || resourceType == null || resourcePath == null) {
            return null;
        }
        String path = resourcePath;
        while (path.startsWith("/")) {
            path = path.substring(1);
        }
        while (path.endsWith("/")) {
            path = path.substring(0, path.length() - 1);
        }
        String[] parts = path.split("/", -1);
        switch (resourceType) {
            case "USER_SESSION":
                if (operation.equals("DELETE") && parts.length == 2 && parts[0].equals("sessions") && !parts[1].isEmpty()) {
                    return new AdminAction("SESSION_DELETED", parts[1]);
                }
                return null;
            case "USER":
                if (parts.length < 2 || !parts[0].equals("users") || parts[1].isEmpty()) {
                    return null;
                }
                if (parts.length == 3 && operation.equals("ACTION") && parts[2].equals("logout")) {
                    return new AdminAction("USER_LOGOUT_ALL", parts[1]);
                }
                if (parts.length == 2 && operation.equals("DELETE")) {
                    return new AdminAction("USER_DELETED", parts[1]);
                }
                if (parts.length == 2 && operation.equals("UPDATE")) {
                    return new AdminAction(USER_UPDATED, parts[1]);
                }
                return null;
            case "REALM":
                if (operation.equals("ACTION") && parts.length == 1 && parts[0].equals("logout-all")) {
                    return new AdminAction("REALM_LOGOUT_ALL", null);
                }
                return null;
            default:
                return null;
        }
    }
}
