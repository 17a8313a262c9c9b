//! Engine errors as gRPC statuses: the one place where that mapping lives.
//!
//! The status message is the engine error's own text (it names the object and the cause,
//! e.g. `volume "x" not found`), so `blockctl` can print it as is. Every variant is matched
//! explicitly: a new engine error must be given a code on purpose.

use tonic::{Code, Status};

use crate::engine::EngineError;

impl From<EngineError> for Status {
    fn from(err: EngineError) -> Self {
        let code = match &err {
            EngineError::NotFound { .. } => Code::NotFound,
            EngineError::AlreadyExists { .. } => Code::AlreadyExists,
            EngineError::InvalidName { .. }
            | EngineError::InvalidSize { .. }
            | EngineError::OutOfRange { .. } => Code::InvalidArgument,
            EngineError::NoSpace { .. }
            | EngineError::OverProvisioned { .. }
            | EngineError::MetaFull { .. } => Code::ResourceExhausted,
            EngineError::ReadOnly { .. }
            | EngineError::ShrinkRefused { .. }
            | EngineError::FailedPrecondition { .. }
            | EngineError::Unrelated { .. } => Code::FailedPrecondition,
            // The engine stopped itself after a fatal I/O error: retrying against this
            // process is pointless, a restart recovers. UNAVAILABLE says exactly that.
            EngineError::Failed(_) => Code::Unavailable,
            EngineError::PoolMismatch { .. }
            | EngineError::Corrupt(_)
            | EngineError::Device(_)
            | EngineError::Meta(_) => Code::Internal,
        };
        Status::new(code, message(&err))
    }
}

impl From<crate::ublk::UblkError> for Status {
    fn from(err: crate::ublk::UblkError) -> Self {
        use crate::ublk::UblkError;
        match err {
            UblkError::Engine(e) => Status::from(e),
            UblkError::Unavailable { .. } | UblkError::InUse { .. } => {
                Status::failed_precondition(err.to_string())
            }
            UblkError::Device { .. } => Status::internal(err.to_string()),
        }
    }
}

/// The error and its sources on one line, each said once.
fn message(err: &EngineError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// A blocking engine task that panicked or was cancelled.
pub(crate) fn join_error(err: tokio::task::JoinError) -> Status {
    tracing::error!(error = %err, "engine task did not complete");
    Status::internal(format!(
        "Internal error: the engine task did not complete: {err}"
    ))
}

/// Codes that mean "the server is at fault" rather than "the request was wrong".
pub(crate) fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ObjectKind;

    #[test]
    fn codes_follow_the_api_contract() {
        let cases: Vec<(EngineError, Code)> = vec![
            (
                EngineError::NotFound {
                    kind: ObjectKind::Volume,
                    name: "x".into(),
                },
                Code::NotFound,
            ),
            (
                EngineError::AlreadyExists {
                    kind: ObjectKind::Volume,
                    name: "x".into(),
                    detail: "with size 1".into(),
                },
                Code::AlreadyExists,
            ),
            (
                EngineError::InvalidName {
                    kind: ObjectKind::Snapshot,
                    name: "A".into(),
                    reason: "bad",
                },
                Code::InvalidArgument,
            ),
            (
                EngineError::InvalidSize {
                    name: "x".into(),
                    reason: "zero".into(),
                },
                Code::InvalidArgument,
            ),
            (
                EngineError::NoSpace {
                    pool: "p".into(),
                    image: "x".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                EngineError::OverProvisioned {
                    pool: "p".into(),
                    what: "creating volume \"x\"".into(),
                    provisioned: 10,
                    requested: 20,
                    capacity: 1,
                    max_ratio: 20.0,
                },
                Code::ResourceExhausted,
            ),
            (
                EngineError::ShrinkRefused {
                    name: "x".into(),
                    size: 2,
                    new_size: 1,
                },
                Code::FailedPrecondition,
            ),
            (
                EngineError::ReadOnly {
                    image: "x@s".into(),
                },
                Code::FailedPrecondition,
            ),
            (EngineError::Failed("eio".into()), Code::Unavailable),
            (
                EngineError::MetaFull {
                    detail: "No space left on device".into(),
                },
                Code::ResourceExhausted,
            ),
            (EngineError::Corrupt("bad key".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert!(status.message().starts_with(&text), "{}", status.message());
        }
    }

    #[test]
    fn not_found_names_the_object() {
        let status = Status::from(EngineError::NotFound {
            kind: ObjectKind::Volume,
            name: "x".into(),
        });
        assert_eq!(status.message(), "volume \"x\" not found");
    }
}
