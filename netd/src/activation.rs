//! Where netd serves: the socket a service manager passed (socket
//! activation, see `common::activation`) or one it binds itself.

use std::path::Path;

use common::activation::Activated;
use common::listener::Listener;

/// Exit code when the manager passed something netd cannot serve on.
pub const EXIT_BAD_ACTIVATION: u8 = 2;

/// The listener to serve on, and the path to remove at exit (only a socket
/// netd bound itself: the manager's socket stays, so that clients keep
/// queueing on it while netd restarts).
pub fn serve_on(
    activated: Option<Activated>,
    socket: Option<&Path>,
    bind: impl FnOnce(&Path) -> Result<Listener, String>,
) -> Result<(Listener, Option<&Path>), String> {
    if let Some(a) = activated {
        log::info!(
            "serving on the socket passed by the service manager (fd 3, {})",
            a.listener.path().display()
        );
        if a.ignored_fds > 0 {
            log::warn!(
                "ignoring {} more passed fd(s): netd serves one socket",
                a.ignored_fds
            );
        }
        if let Some(p) = socket.filter(|p| *p != a.listener.path()) {
            log::warn!(
                "--socket {} ignored: serving on the passed socket {}",
                p.display(),
                a.listener.path().display()
            );
        }
        return Ok((a.listener, None));
    }
    let path = socket.ok_or("--socket is required unless netd is socket-activated (LISTEN_FDS)")?;
    let listener = bind(path)?;
    log::info!("bound and serving on {}", path.display());
    Ok((listener, Some(path)))
}
