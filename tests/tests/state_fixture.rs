//! The machine state fixtures (`tests/fixtures/machine-state-X.Y.ron`) are
//! what real sources wrote: each is captured from a real source by a fake
//! target (`capture_from_source`), and the fixture of the format this build
//! writes must have the same fields as what the source writes today. So a
//! change to the document without a format bump and a new fixture fails
//! here, and the unit tests (`vmm::persist`, `vmm::machine`) load and
//! restore every released fixture.
//!
//! Capturing a new fixture (after bumping `MACHINE_STATE_FORMAT`):
//! `CAPTURE_STATE_FIXTURE=1 cargo test --release -p tests --test
//! state_fixture`. It writes a fixture only where none exists: a released
//! one is never rewritten.

use std::collections::BTreeSet;
use std::path::PathBuf;

use ron::Value;
use tests::migration_harness::{
    GuestSpec, MigEnv, assert_answers_ping, capture_from_source, start_source,
};
use vmm::persist::{MACHINE_STATE_FORMAT, MachineState};

/// Guest number of the fixtures' guest: MAC 52:54:00:12:34:56.
const FIXTURE_GUEST: u8 = 0x56;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("machine-state-{MACHINE_STATE_FORMAT}.ron"))
}

/// Every field path of a RON document (`.vm.pic_master`,
/// `.nets[].mmio.queues[].max_size`...), values left out.
fn field_paths(text: &str) -> BTreeSet<String> {
    fn walk(v: &Value, at: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Map(m) => {
                for (k, v) in m.iter() {
                    let name = match k {
                        Value::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    };
                    let path = format!("{at}.{name}");
                    out.insert(path.clone());
                    walk(v, &path, out);
                }
            }
            Value::Seq(items) => {
                for i in items {
                    walk(i, &format!("{at}[]"), out);
                }
            }
            Value::Option(Some(inner)) => walk(inner, at, out),
            _ => {}
        }
    }
    let v: Value = ron::from_str(text).expect("a RON document");
    let mut out = BTreeSet::new();
    walk(&v, "", &mut out);
    out
}

#[test]
fn the_current_format_has_a_fixture_captured_from_a_real_source() {
    // The fixtures' guest: 32 MiB, one NIC `vm0` with one queue, a few
    // pings answered before the capture.
    let env = MigEnv::new("sfx");
    let api = env.path("api.sock");
    let spec = GuestSpec {
        n: FIXTURE_GUEST,
        nets: vec![env.net("vm0", FIXTURE_GUEST, "")],
        memory: "32M",
        vcpus: 1,
        cmdline: "",
    };
    let _source = start_source(&env, &spec, &api);
    assert_answers_ping(&env, FIXTURE_GUEST, "before the capture");
    let captured = capture_from_source(&env, &api).state;
    assert_answers_ping(&env, FIXTURE_GUEST, "after the capture");

    let live = MachineState::from_ron(&captured).expect("the source's state loads");
    assert_eq!(live.format, MACHINE_STATE_FORMAT);
    assert_eq!(live.memory_bytes, 32 << 20);
    assert_eq!(live.nets.len(), 1);
    assert_eq!(live.nets[0].net.backend.tap_fds, vec![1]);

    let path = fixture_path();
    if !path.exists() && std::env::var("CAPTURE_STATE_FIXTURE").as_deref() == Ok("1") {
        std::fs::write(&path, &captured).expect("write the fixture");
        eprintln!("captured {}", path.display());
    }
    let fixture = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no fixture for format {MACHINE_STATE_FORMAT} ({}: {e}): capture one with \
             CAPTURE_STATE_FIXTURE=1 and add it to vmm::persist::FIXTURES",
            path.display()
        )
    });
    let (want, got) = (field_paths(&fixture), field_paths(&captured));
    let missing: Vec<_> = want.difference(&got).collect();
    let added: Vec<_> = got.difference(&want).collect();
    assert!(
        missing.is_empty() && added.is_empty(),
        "the source writes another document than format {MACHINE_STATE_FORMAT}'s fixture \
         (bump MACHINE_STATE_FORMAT and capture a fixture): missing {missing:?}, added {added:?}"
    );
    // A document read back writes the same fields (nothing dropped on the
    // way through this build's types).
    let again = live.to_ron().expect("to RON");
    assert_eq!(field_paths(&again), got);
}
