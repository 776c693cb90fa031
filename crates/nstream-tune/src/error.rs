//! The one error type of nstream-tune.

/// Why a fine-tuning run could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The base model could not be resolved or read.
    #[error(transparent)]
    Model(#[from] nstream_llm::Error),

    /// The adapter or a checkpoint could not be read or written.
    #[error(transparent)]
    Peft(#[from] nstream_peft::Error),

    /// A setting is invalid (a learning rate of 0, an unknown target module...).
    #[error("invalid setting `{setting}`: {message}")]
    InvalidSetting {
        /// The setting, by its flag name.
        setting: &'static str,
        /// What is wrong and what was expected.
        message: String,
    },

    /// The training data is invalid; `location` is `file:line` (or the file).
    #[error("{location}: {message}")]
    InvalidData {
        /// Where: `file:line`, or the file alone.
        location: String,
        /// What is wrong and what was expected.
        message: String,
    },

    /// The output folder holds another run, or a checkpoint that does not match.
    #[error("{path}: {message}")]
    Output {
        /// The folder or file.
        path: String,
        /// What is wrong.
        message: String,
    },

    /// The run would not fit in memory.
    #[error(
        "the run needs about {needed_mib} MiB (weights {weights_mib}, optimiser {optimizer_mib}, activations \
         {activations_mib}) but {available_mib} MiB are available; lower --batch-size or --max-seq-len, use LoRA, \
         or a smaller model"
    )]
    OutOfMemory {
        /// Estimated total, MiB.
        needed_mib: u64,
        /// Of which the weights.
        weights_mib: u64,
        /// Of which gradients and the optimiser's state.
        optimizer_mib: u64,
        /// Of which the activations kept for the backward pass.
        activations_mib: u64,
        /// What the machine has free (or the configured limit), MiB.
        available_mib: u64,
    },

    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        cause: std::io::Error,
    },

    /// A tensor computation failed.
    #[error("tensor computation failed: {0}")]
    Tensor(String),

    /// The loss or a gradient became NaN or infinite.
    #[error("training diverged at step {step}: {what} is not finite (lower --learning-rate)")]
    Diverged {
        /// The optimiser step.
        step: usize,
        /// What was not finite.
        what: String,
    },
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Self::Tensor(error.to_string())
    }
}

impl Error {
    pub(crate) fn io(path: &std::path::Path, cause: std::io::Error) -> Self {
        Self::Io { path: path.display().to_string(), cause }
    }

    pub(crate) fn setting(setting: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidSetting { setting, message: message.into() }
    }
}

/// The result type of nstream-tune.
pub type Result<T, E = Error> = std::result::Result<T, E>;
