//! vhost-user-net: the virtio-net datapath in a process of its own. It
//! asks netd for a TAP as its own user (netd's policy, quota and audit
//! apply as for a vmm), drops to `--user`, sandboxes itself, and serves one
//! vhost-user frontend at a time on its socket: the frontend shares guest
//! RAM (memfd) and hands over each ring's kick and call eventfds, so
//! frames go between the TAP and guest memory here and nowhere else.
//!
//! - [`args`]: the command line;
//! - [`backend`]: the `VhostUserBackend` (features, rings per thread, events);
//! - [`worker`]: one queue pair's rx/tx/control serving;
//! - [`peer`]: which frontend may connect (SO_PEERCRED);
//! - [`sandbox`]: capabilities, no_new_privs, Landlock, seccomp.

mod args;
mod backend;
mod peer;
mod sandbox;
mod serve;
mod worker;

use std::process::exit;

use args::Invocation;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Run(a)) => a,
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            exit(0);
        }
        Err(e) => {
            eprintln!("vhost-user-net: {e}");
            exit(i32::from(cli::EXIT_USAGE));
        }
    };
    match serve::run(&args) {
        Ok(()) => exit(0),
        Err(e) => {
            eprintln!("vhost-user-net: {e}");
            exit(e.exit_code());
        }
    }
}
