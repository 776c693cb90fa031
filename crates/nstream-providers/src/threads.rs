//! candle's CPU kernels take their thread count from `RAYON_NUM_THREADS`; without it they call
//! `num_cpus::get_physical()` on every matrix product, which reads /proc/cpuinfo each time (6-10%
//! of a small model's decode time, measured in docs/benchmarks.md) and counts the machine's cores,
//! not the container's CPU quota. Setting an environment variable in a running process needs
//! `unsafe` (`std::env::set_var`), which the workspace forbids, so a serving process re-executes
//! itself once with the variable set, before it starts any thread.

/// Re-executes the current program with `RAYON_NUM_THREADS` set to `threads` (or the CPUs this
/// process may use: affinity and cgroup quota) when it is not set; returns only if it was already
/// set or the re-execution failed (then serving goes on, just slower). Call it first in `main`,
/// before any runtime or thread pool exists.
pub fn pin_candle_threads(threads: Option<usize>) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let threads = threads.or_else(|| std::thread::available_parallelism().ok().map(usize::from)).unwrap_or(1);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let Ok(executable) = std::env::current_exe() else { return };
        let mut arguments = std::env::args_os();
        let program = arguments.next().unwrap_or_else(|| executable.clone().into_os_string());
        let error = std::process::Command::new(&executable)
            .arg0(program)
            .args(arguments)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .exec();
        eprintln!("warning: could not re-execute with RAYON_NUM_THREADS={threads} ({error}); continuing without it");
    }
}
