//! Landlock: after set-up the backend touches no file at all. Every fd it
//! needs is open by then (TAP queues, its listening socket); the memory
//! table and ring eventfds arrive as fds. No TCP, no abstract UNIX
//! sockets, no signals to other processes. Best effort on kernels without
//! Landlock (logged).

use landlock::{
    ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetError, RulesetStatus, Scope,
};

/// The ABI whose rights are handled (as the vmm's: fixed, not the newest).
const HANDLED_ABI: ABI = ABI::V6;

/// Restricts the calling thread and every thread it creates later.
pub fn restrict() -> Result<(), RulesetError> {
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(HANDLED_ABI))?
        .handle_access(AccessNet::from_all(HANDLED_ABI))?
        .scope(Scope::from_all(HANDLED_ABI))?
        .create()?
        .restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {}
        RulesetStatus::PartiallyEnforced => log::info!("Landlock is only partly enforced"),
        RulesetStatus::NotEnforced => {
            log::info!("Landlock is not supported by this kernel: no filesystem sandbox")
        }
    }
    Ok(())
}
