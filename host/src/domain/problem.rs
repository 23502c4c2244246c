//! The problem codes: the one list of the stable `code`s the API answers with (in its RFC 9457
//! problem documents) and the audit log records for refused actions. Which HTTP status each
//! code is sent with is the API's business (`api/error.rs`).

string_enum! {
    /// Why a request was refused or failed, in the stable spelling clients and the audit log
    /// see.
    ProblemCode {
        /// Malformed or out-of-bounds input, or a body of the wrong media type.
        Validation => "VALIDATION",
        /// A body or upload over its size limit.
        PayloadTooLarge => "PAYLOAD_TOO_LARGE",
        /// A connector manifest that does not parse or breaks a rule.
        InvalidManifest => "INVALID_MANIFEST",
        /// A connector component that does not load.
        InvalidComponent => "INVALID_COMPONENT",
        /// Missing or invalid credentials.
        Unauthorized => "UNAUTHORIZED",
        /// Valid credentials without the permission.
        Forbidden => "FORBIDDEN",
        /// The named session, connector, delivery or route does not exist (in this realm).
        NotFound => "NOT_FOUND",
        /// The session id is taken in the realm.
        AlreadyExists => "ALREADY_EXISTS",
        /// A CHILD names a parent that does not exist.
        ParentNotFound => "PARENT_NOT_FOUND",
        /// A CHILD names a parent that has ended.
        ParentNotActive => "PARENT_NOT_ACTIVE",
        /// A destroy named a session of the wrong kind for its route.
        WrongKind => "WRONG_KIND",
        /// The resource is not in a state that allows the change.
        Conflict => "CONFLICT",
        /// An IdP event or logout token that was applied before.
        DuplicateEvent => "DUPLICATE_EVENT",
        /// A destroy would end more sessions than `[limits] max_cascade`; nothing changed.
        CascadeTooLarge => "CASCADE_TOO_LARGE",
        /// A tree holds more sessions than `[limits] max_tree` lets one read return.
        TreeTooLarge => "TREE_TOO_LARGE",
        /// The caller used up its request budget.
        RateLimited => "RATE_LIMITED",
        /// The route exists, not with this method.
        MethodNotAllowed => "METHOD_NOT_ALLOWED",
        /// The request body did not arrive in time.
        RequestTimeout => "REQUEST_TIMEOUT",
        /// The database is busy or the store is shutting down.
        Unavailable => "UNAVAILABLE",
        /// New sessions are held while deliveries to connectors catch up.
        DeliveryBacklog => "DELIVERY_BACKLOG",
        /// A fault of the server; the details are in its log only.
        Internal => "INTERNAL",
    }
}

impl ProblemCode {
    /// Whether the audit log records a refusal with this code: the domain's refusals of a
    /// change and refused connectors, actions the caller was allowed to ask for. Bad input,
    /// authentication, permission, a refused read, limits and server failures are logged,
    /// not audited.
    pub fn audited(self) -> bool {
        match self {
            ProblemCode::NotFound
            | ProblemCode::AlreadyExists
            | ProblemCode::ParentNotFound
            | ProblemCode::ParentNotActive
            | ProblemCode::WrongKind
            | ProblemCode::Conflict
            | ProblemCode::DuplicateEvent
            | ProblemCode::CascadeTooLarge
            | ProblemCode::InvalidManifest
            | ProblemCode::InvalidComponent => true,
            ProblemCode::Validation
            | ProblemCode::PayloadTooLarge
            | ProblemCode::Unauthorized
            | ProblemCode::Forbidden
            | ProblemCode::TreeTooLarge
            | ProblemCode::RateLimited
            | ProblemCode::MethodNotAllowed
            | ProblemCode::RequestTimeout
            | ProblemCode::Unavailable
            | ProblemCode::DeliveryBacklog
            | ProblemCode::Internal => false,
        }
    }
}
