//! API errors in the shape the real API server returns them: a `meta/v1 Status` with `reason`,
//! `code` and, for invalid objects, one cause per field.

use serde_json::{Value, json};

use ec2_kubelet::schema::{FieldError, FieldErrorKind};

/// One failed request, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `details` of the Status (name, group, kind, causes).
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, group: &str, kind: &str, name: &str) -> ApiError {
        self.details = Some(json!({"name": name, "group": group, "kind": kind}));
        self
    }

    /// `pods "web" not found`.
    pub fn not_found(group: &str, resource: &str, name: &str) -> ApiError {
        let qualified = qualified(group, resource);
        ApiError::new(404, "NotFound", format!("{qualified} \"{name}\" not found"))
            .with_details(group, resource, name)
    }

    /// A path the server does not serve.
    pub fn no_route(path: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// `pods "web" already exists`.
    pub fn already_exists(group: &str, resource: &str, name: &str) -> ApiError {
        let qualified = qualified(group, resource);
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{qualified} \"{name}\" already exists"),
        )
        .with_details(group, resource, name)
    }

    /// An update based on a stale `resourceVersion` (optimistic concurrency).
    pub fn conflict(group: &str, resource: &str, name: &str, why: &str) -> ApiError {
        let qualified = qualified(group, resource);
        ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {qualified} \"{name}\": {why}"),
        )
        .with_details(group, resource, name)
    }

    /// The object is invalid: 422 with one cause per field error.
    pub fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> ApiError {
        let qualified_kind = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|error| {
                let reason = match error.kind {
                    FieldErrorKind::Required => "FieldValueRequired",
                    FieldErrorKind::NotSupported { .. } => "FieldValueNotSupported",
                    FieldErrorKind::TooLong { .. } => "FieldValueTooLong",
                    FieldErrorKind::TooMany { .. } => "FieldValueTooMany",
                    FieldErrorKind::Unknown => "FieldValueInvalid",
                    FieldErrorKind::Invalid { .. } => "FieldValueInvalid",
                };
                let message = error.to_string();
                let message = message
                    .strip_prefix(&format!("{}: ", error.path))
                    .unwrap_or(&message)
                    .to_string();
                json!({"reason": reason, "message": message, "field": error.path})
            })
            .collect();
        let mut error = ApiError::new(
            422,
            "Invalid",
            ec2_kubelet::schema::invalid_message(&qualified_kind, name, errors),
        );
        error.details = Some(json!({"name": name, "group": group, "kind": kind, "causes": causes}));
        error
    }

    /// One invalid field, for the server's own checks of built-in objects.
    pub fn invalid_field(
        group: &str,
        kind: &str,
        name: &str,
        path: &str,
        detail: &str,
        value: Value,
    ) -> ApiError {
        let error = FieldError {
            path: path.to_string(),
            kind: if detail.is_empty() {
                FieldErrorKind::Required
            } else {
                FieldErrorKind::Invalid {
                    value,
                    detail: detail.to_string(),
                }
            },
        };
        ApiError::invalid(group, kind, name, &[error])
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// A request the server understood but cannot carry out (e.g. a JSON patch `test` failed).
    pub fn unprocessable(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(403, "Forbidden", message)
    }

    /// A request body over the API server's limit, in kube-apiserver's words.
    pub fn entity_too_large(limit: usize) -> ApiError {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    pub fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type})"
            ),
        )
    }

    /// The requested `resourceVersion` is older than the retained history.
    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    /// A plain error from the storage layer (etcd's), which kube-apiserver answers as a 500
    /// without a reason.
    pub fn storage(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "", message)
    }

    /// API priority and fairness turning a request away (sent with `Retry-After`).
    pub fn too_many_requests(message: impl Into<String>) -> ApiError {
        ApiError::new(429, "TooManyRequests", message)
    }

    /// A proxy that could not reach the server behind it.
    pub fn bad_gateway(message: impl Into<String>) -> ApiError {
        ApiError::new(502, "InternalError", message)
    }

    pub fn not_implemented(message: impl Into<String>) -> ApiError {
        ApiError::new(501, "NotImplemented", message)
    }

    pub fn service_unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// The `meta/v1 Status` body.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        if !self.reason.is_empty() {
            status["reason"] = json!(self.reason);
        }
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// `pods` or `ec2nodepools.ec2-kubelet.io`, as the server names a resource in messages.
pub fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// A successful deletion (`Status` with `status: Success`).
pub fn deleted_status(group: &str, resource: &str, name: &str, uid: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": group, "kind": resource, "uid": uid},
    })
}
