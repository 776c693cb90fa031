//! Thread settings of a training process.
//!
//! candle runs its matrix products on rayon (`RAYON_NUM_THREADS` threads) and its element-wise
//! operations on a second pool of its own (`CANDLE_NUM_THREADS`, by default as many), whose
//! threads spin between operations. In training, matrix products and element-wise operations
//! alternate thousands of times a step, and the two pools then fight for the same cores: on two
//! cores, a third of the CPU time went to that spinning. With `CANDLE_NUM_THREADS=1` the
//! element-wise operations run on the calling thread (the fused kernels of this crate use
//! rayon), and the products keep every core. Setting an environment variable in a running
//! process needs `unsafe`, which the workspace forbids, so the process re-executes itself once
//! with the variables set, before it starts any thread.

/// Re-executes the current program with `CANDLE_NUM_THREADS=1` and `RAYON_NUM_THREADS` set (to
/// `threads`, else the CPUs this process may use) when either is unset; returns only when both
/// were set or the re-execution failed (training then goes on, just slower). Call it first in
/// `main`, before any thread pool exists.
pub fn pin_training_threads(threads: Option<usize>) {
    let rayon = std::env::var_os("RAYON_NUM_THREADS");
    if rayon.is_some() && std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let Ok(executable) = std::env::current_exe() else { return };
        let mut command = std::process::Command::new(&executable);
        let mut arguments = std::env::args_os();
        command.arg0(arguments.next().unwrap_or_else(|| executable.clone().into_os_string())).args(arguments);
        if rayon.is_none() {
            let threads = threads.or_else(|| std::thread::available_parallelism().ok().map(usize::from)).unwrap_or(1);
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            command.env("CANDLE_NUM_THREADS", "1");
        }
        let error = command.exec();
        eprintln!("warning: could not re-execute with the training thread settings ({error}); continuing without");
    }
    #[cfg(not(unix))]
    let _ = threads;
}
