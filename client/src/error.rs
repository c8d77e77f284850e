//! The client's error type.

use protocol::{ErrorCode, ErrorResponse, ProtocolError};
use thiserror::Error;

/// Result type of every fallible client operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a client operation failed.
///
/// Whether the operation may nevertheless have taken effect is answered by
/// [`Error::is_unknown_outcome`]; that matters for appends, which are the only requests with an
/// effect that cannot be repeated safely.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// The node answered with an error frame.
    #[error("{}", server_display(*code, message, leader))]
    Server {
        /// The error code; see `docs/protocol.md` section 7 for what each one means.
        code: ErrorCode,
        /// Human-readable description from the node, possibly empty.
        message: String,
        /// For [`ErrorCode::NotLeader`]: the leader's address, if the node knows it.
        leader: String,
        /// Code-specific number: the log's next offset for [`ErrorCode::OffsetConflict`], the
        /// next expected sequence for [`ErrorCode::SequenceGap`], the offset the replica has
        /// committed for [`ErrorCode::Behind`], 0 otherwise.
        detail: u64,
    },
    /// No connection could be established (or none was usable) before the request was sent.
    /// The request had no effect.
    #[error("connect: {0}")]
    Connect(String),
    /// The TLS handshake failed: certificate verification, ALPN, client certificate.
    #[error("tls: {0}")]
    Tls(String),
    /// The connection or the stream was lost after the request may have been sent, and no
    /// answer arrived.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// No answer arrived within the request timeout after the request may have been sent.
    #[error("request timed out")]
    Timeout,
    /// The request was sent more than once: an earlier attempt's answer was lost, and the last
    /// attempt failed (the string says how). An earlier attempt may have taken effect: the
    /// outcome is unknown.
    #[error("not acknowledged; it may or may not be stored: {0}")]
    Unacknowledged(String),
    /// The node's answer could not be decoded, or was not an answer to the request made.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// A batch in a read answer failed its checks (checksum, layout or offsets); no record of it
    /// was delivered.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The client configuration or an argument is invalid (bad address, missing CA file, empty
    /// append...). Nothing was sent.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// The node's error code, for [`Error::Server`]; `None` for every other variant.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the request may or may not have taken effect: an append may be stored (and
    /// become readable later) although no receipt was received.
    ///
    /// This is the case for [`Error::ConnectionLost`] and [`Error::Timeout`] (the request may
    /// have reached the node, no answer says what happened), for [`Error::Protocol`] (an answer
    /// arrived but could not be understood), and for [`Error::Server`] with a code whose
    /// [`ErrorCode::is_definite`] is false (`timeout`, `storage_failed`, `internal`). Every other error is
    /// definite: the request had no effect. A request resent after an attempt whose answer was
    /// lost (a producer's append, retried) does not end with a definite error: whatever the
    /// last attempt met, the earlier one may have taken effect, so it ends with
    /// [`Error::Unacknowledged`] (the exception is `sequence_gap`, which says that the node
    /// holds nothing of the append). For requests without side effects (reads, listing,
    /// status) an unknown outcome only means that no usable answer arrived.
    pub fn is_unknown_outcome(&self) -> bool {
        match self {
            Error::Server { code, .. } => !code.is_definite(),
            Error::ConnectionLost(_)
            | Error::Timeout
            | Error::Protocol(_)
            | Error::Unacknowledged(_) => true,
            Error::Connect(_) | Error::Tls(_) | Error::Corrupt(_) | Error::Config(_) => false,
        }
    }

    /// True for failures of the transport that a new attempt on a fresh connection may not
    /// meet: failed connects, lost connections and streams, timeouts.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connect(_) | Error::ConnectionLost(_) | Error::Timeout
        )
    }

    /// This failure as the outcome of a request of which an earlier attempt may have taken
    /// effect (it was sent, and its answer was lost): a definite failure of the last attempt
    /// says nothing about the earlier one, so the outcome is unknown.
    pub(crate) fn after_resend(self) -> Error {
        if self.is_unknown_outcome() {
            return self;
        }
        // The last attempt's own words ("nothing was stored") are about that attempt only;
        // only its code is kept.
        let last = match &self {
            Error::Server { code, leader, .. } => server_display(*code, "", leader),
            other => other.to_string(),
        };
        Error::Unacknowledged(format!(
            "an earlier attempt was sent and its answer lost; the last attempt was refused ({last})"
        ))
    }

    /// The same failure, for a request that was certainly not sent.
    pub(crate) fn not_sent(self) -> Error {
        match self {
            Error::ConnectionLost(m) => Error::Connect(m),
            Error::Timeout => Error::Connect("timed out before the request was sent".into()),
            other => other,
        }
    }
}

fn server_display(code: ErrorCode, message: &str, leader: &str) -> String {
    let mut s = code.name().to_string();
    if !message.is_empty() {
        s.push_str(": ");
        s.push_str(message);
    }
    if !leader.is_empty() {
        s.push_str(" (leader: ");
        s.push_str(leader);
        s.push(')');
    }
    s
}

impl From<ErrorResponse> for Error {
    fn from(e: ErrorResponse) -> Error {
        Error::Server {
            code: e.code,
            message: e.message,
            leader: e.leader,
            detail: e.detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: ErrorCode) -> Error {
        Error::Server {
            code,
            message: String::new(),
            leader: String::new(),
            detail: 0,
        }
    }

    #[test]
    fn a_definite_failure_after_a_resend_is_an_unknown_outcome() {
        let refused = Error::Server {
            code: ErrorCode::NotLeader,
            message: String::new(),
            leader: String::new(),
            detail: 0,
        };
        assert!(!refused.is_unknown_outcome());
        let after = refused.after_resend();
        assert!(after.is_unknown_outcome());
        assert!(after.to_string().contains("not_leader"), "{after}");
        // The refusal's own words about the last attempt are not repeated as the outcome.
        let refused = Error::Server {
            code: ErrorCode::NotEnoughReplicas,
            message: "acks=sync needs 1 replicas; nothing was stored".into(),
            leader: String::new(),
            detail: 0,
        };
        let after = refused.after_resend().to_string();
        assert!(
            after.starts_with("not acknowledged; it may or may not be stored")
                && after.contains("not_enough_replicas")
                && !after.contains("nothing was stored"),
            "{after}"
        );
        assert!(Error::Connect("x".into())
            .after_resend()
            .is_unknown_outcome());
        assert_eq!(Error::Timeout.after_resend(), Error::Timeout);
    }

    #[test]
    fn unknown_outcome_classification() {
        assert!(Error::Timeout.is_unknown_outcome());
        assert!(Error::ConnectionLost("reset".into()).is_unknown_outcome());
        assert!(Error::Protocol(ProtocolError::UnknownErrorCode(99)).is_unknown_outcome());
        assert!(server(ErrorCode::Timeout).is_unknown_outcome());
        assert!(server(ErrorCode::StorageFailed).is_unknown_outcome());

        assert!(!server(ErrorCode::NotLeader).is_unknown_outcome());
        assert!(!server(ErrorCode::OffsetConflict).is_unknown_outcome());
        assert!(!server(ErrorCode::SequenceGap).is_unknown_outcome());
        assert!(!server(ErrorCode::Busy).is_unknown_outcome());
        // A replica below the read's min_offset answered without reading anything.
        assert!(!server(ErrorCode::Behind).is_unknown_outcome());
        assert!(!server(ErrorCode::Behind).is_transient());
        assert!(!Error::Connect("refused".into()).is_unknown_outcome());
        assert!(!Error::Tls("bad certificate".into()).is_unknown_outcome());
        assert!(!Error::Corrupt("crc".into()).is_unknown_outcome());
        assert!(!Error::Config("no servers".into()).is_unknown_outcome());

        // A failure before sending is definite.
        assert!(!Error::Timeout.not_sent().is_unknown_outcome());
        assert!(!Error::ConnectionLost("closed".into())
            .not_sent()
            .is_unknown_outcome());
    }

    #[test]
    fn codes_and_display() {
        let e = Error::Server {
            code: ErrorCode::NotLeader,
            message: "ask elsewhere".into(),
            leader: "10.0.0.2:7001".into(),
            detail: 0,
        };
        assert_eq!(e.code(), Some(ErrorCode::NotLeader));
        assert_eq!(
            e.to_string(),
            "not_leader: ask elsewhere (leader: 10.0.0.2:7001)"
        );
        assert_eq!(server(ErrorCode::LogExists).to_string(), "log_exists");
        assert_eq!(server(ErrorCode::Behind).code(), Some(ErrorCode::Behind));
        assert_eq!(server(ErrorCode::Behind).to_string(), "behind");
        assert_eq!(Error::Timeout.code(), None);
        assert_eq!(
            Error::from(ErrorResponse {
                code: ErrorCode::OffsetConflict,
                message: "m".into(),
                leader: String::new(),
                detail: 42,
            }),
            Error::Server {
                code: ErrorCode::OffsetConflict,
                message: "m".into(),
                leader: String::new(),
                detail: 42,
            }
        );
    }
}
