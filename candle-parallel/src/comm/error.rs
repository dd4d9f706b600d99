//! Communicator errors. They convert into [`candle_core::Error`] so that `?` works in model
//! code; the message always names the operation, the group and the ranks involved.

/// Why a communicator call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// The ranks of a group called different operations, or the same one with incompatible
    /// arguments. Every rank of the group gets this error.
    #[error("{op} (call #{call} on group {group}): {details}")]
    Mismatch {
        op: String,
        call: u64,
        group: String,
        details: String,
    },
    /// The group was aborted earlier: a rank failed, or an earlier call on it failed.
    #[error("{op} on group {group} (rank {rank}) was aborted: {reason}")]
    Aborted {
        op: String,
        group: String,
        rank: usize,
        reason: String,
    },
    /// Some ranks did not reach a call within the timeout.
    #[error(
        "{op} (call #{call} on group {group}) timed out after {secs:.1}s on rank {rank}: \
         rank(s) {missing:?} never arrived. If they are only slow, raise the timeout \
         (Launcher::timeout or CANDLE_PARALLEL_TIMEOUT_SECS)"
    )]
    Timeout {
        op: String,
        call: u64,
        group: String,
        rank: usize,
        secs: f64,
        missing: Vec<usize>,
    },
    /// Bad arguments on this rank alone (caught before any other rank is involved).
    #[error("{op} on group {group} (rank {rank}): {msg}")]
    Invalid {
        op: String,
        group: String,
        rank: usize,
        msg: String,
    },
    /// The backend cannot do this (e.g. the thread backend given CUDA tensors).
    #[error("the {backend} communication backend does not support {what}")]
    Unsupported { backend: &'static str, what: String },
}

impl From<CommError> for candle_core::Error {
    fn from(e: CommError) -> Self {
        candle_core::Error::Wrapped(Box::new(e))
    }
}
