//! What the workspace's command-line programs share: running `main` on a tokio runtime, waiting
//! for SIGINT or SIGTERM, and failing with a message.

use std::process::ExitCode;

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_termination() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// Runs `main` on a multi-threaded tokio runtime.
pub fn block_on(main: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => fail(&format!("starting the async runtime: {e}")),
    }
}

/// Prints `error: <message>` and fails.
pub fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}
