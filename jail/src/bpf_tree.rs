//! Turns a seccompiler JSON allow-list into a BPF program that finds the
//! syscall number by binary search instead of seccompiler's linear chain.
//!
//! Used by `vmm/build.rs`, which compiles every thread kind's filter at build
//! time (nothing is parsed at start-up), and by the unit tests, which check
//! that the tree gives the same verdict as seccompiler's own program.
//!
//! Why a tree: installing a filter makes the kernel emulate it once per
//! syscall number to build its allow cache (`seccomp_cache_prepare`), and a
//! linear chain of 78 syscalls costs that about 0.3 ms here for the `setup`
//! filter alone; every syscall made later also walks the chain. The tree
//! needs about 2·log2(n) steps. Each syscall's rule chain (its argument
//! checks) is seccompiler's own code, taken unchanged from a program
//! compiled for that syscall alone.

use seccompiler::{BpfProgram, TargetArch, sock_filter};

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
/// `offsetof(struct seccomp_data, nr)`.
const NR_OFFSET: u32 = 0;
/// The kernel's limit on a classic BPF program (BPF_MAXINSNS).
const MAX_LEN: usize = 4096;
/// Below this many syscalls a subtree is a short chain of compares.
const LEAF: usize = 3;

/// seccompiler's linear program for filter `name` of `json`, with the
/// default action replaced by `log` when `log_mode` (debugging).
pub fn linear(json: &str, name: &str, log_mode: bool) -> Result<BpfProgram, String> {
    compile_one(&document(json, name, log_mode)?, name)
}

/// The policy document `json`, checked to hold filter `name`, with that
/// filter's default action replaced by `log` when `log_mode`.
fn document(json: &str, name: &str, log_mode: bool) -> Result<serde_json::Value, String> {
    let mut doc: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let filter = doc
        .get_mut(name)
        .ok_or_else(|| format!("no filter named {name}"))?;
    if log_mode {
        filter["default_action"] = serde_json::Value::from("log");
    }
    Ok(doc)
}

fn compile_one(doc: &serde_json::Value, name: &str) -> Result<BpfProgram, String> {
    let text = doc.to_string();
    let mut map = seccompiler::compile_from_json(text.as_bytes(), TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    map.remove(name)
        .ok_or_else(|| format!("no filter named {name}"))
}

/// A jump whose target is known once the whole program is laid out.
enum Target {
    Block(usize),
    Default,
    At(usize),
}

/// The binary-search program for filter `name` of `json`.
pub fn tree(json: &str, name: &str, log_mode: bool) -> Result<BpfProgram, String> {
    let full = linear(json, name, log_mode)?;
    // seccompiler's layout: [arch load, arch check, kill][load nr] ... [default].
    let (Some(head), Some(default)) = (full.get(..4), full.last().cloned()) else {
        return Err(format!("{name}: unexpected program layout"));
    };
    if head[3].code != BPF_LD_W_ABS || head[3].k != NR_OFFSET || default.code != BPF_RET_K {
        return Err(format!("{name}: unexpected program layout"));
    }

    let doc = document(json, name, log_mode)?;
    let entries = doc[name]["filter"]
        .as_array()
        .ok_or_else(|| format!("{name}: no filter list"))?
        .clone();
    // One program per syscall (all its entries): its rule chain is the block.
    let mut names: Vec<&str> = Vec::new();
    for e in &entries {
        let s = e["syscall"]
            .as_str()
            .ok_or_else(|| format!("{name}: an entry without a syscall"))?;
        if !names.contains(&s) {
            names.push(s);
        }
    }
    let mut blocks: Vec<(u32, Vec<sock_filter>)> = Vec::with_capacity(names.len());
    for s in &names {
        let mut one = doc.clone();
        one[name]["filter"] = serde_json::Value::Array(
            entries
                .iter()
                .filter(|e| e["syscall"].as_str() == Some(s))
                .cloned()
                .collect(),
        );
        let p = compile_one(&one, name)?;
        // [arch ×3][load nr][jeq nr, 0, 1][chain ... ret mismatch][default]
        let jeq = p.get(4).cloned();
        let (Some(jeq), true) = (jeq, p.len() > 6) else {
            return Err(format!("{name}/{s}: unexpected program layout"));
        };
        if jeq.code != BPF_JMP_JEQ_K || jeq.jt != 0 || jeq.jf != 1 {
            return Err(format!("{name}/{s}: unexpected program layout"));
        }
        blocks.push((jeq.k, p[5..p.len() - 1].to_vec()));
    }
    blocks.sort_by_key(|b| b.0);
    if blocks.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(format!("{name}: two names for one syscall number"));
    }

    let mut out: Vec<sock_filter> = head.to_vec();
    let mut jumps: Vec<(usize, Target)> = Vec::new();
    let keys: Vec<(u32, usize)> = blocks.iter().enumerate().map(|(i, b)| (b.0, i)).collect();
    emit(&keys, &mut out, &mut jumps);
    let mut block_at = Vec::with_capacity(blocks.len());
    for (_, b) in &blocks {
        block_at.push(out.len());
        out.extend_from_slice(b);
    }
    let default_at = out.len();
    out.push(default);
    for (at, target) in jumps {
        let to = match target {
            Target::Block(i) => block_at[i],
            Target::Default => default_at,
            Target::At(p) => p,
        };
        out[at].k = u32::try_from(to - at - 1).map_err(|e| e.to_string())?;
    }
    if out.len() > MAX_LEN {
        return Err(format!("{name}: {} instructions", out.len()));
    }
    Ok(out)
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Emits the search over `keys` (sorted syscall numbers, block indexes).
/// Only 0/1 conditional offsets: every far target is a `ja` (32-bit).
fn emit(keys: &[(u32, usize)], out: &mut Vec<sock_filter>, jumps: &mut Vec<(usize, Target)>) {
    if keys.len() <= LEAF {
        for &(nr, block) in keys {
            out.push(sock_filter {
                code: BPF_JMP_JEQ_K,
                jt: 0,
                jf: 1,
                k: nr,
            });
            jumps.push((out.len(), Target::Block(block)));
            out.push(stmt(BPF_JMP_JA, 0));
        }
        jumps.push((out.len(), Target::Default));
        out.push(stmt(BPF_JMP_JA, 0));
        return;
    }
    let mid = keys.len() / 2;
    // nr >= middle: the `ja` to the upper half; below: skip it.
    out.push(sock_filter {
        code: BPF_JMP_JGE_K,
        jt: 0,
        jf: 1,
        k: keys[mid].0,
    });
    let to_upper = out.len();
    out.push(stmt(BPF_JMP_JA, 0));
    emit(&keys[..mid], out, jumps);
    jumps.push((to_upper, Target::At(out.len())));
    emit(&keys[mid..], out, jumps);
}
