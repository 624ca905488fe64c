//! The README's commands share one build of the dependencies: `cargo run -p kvc-cli` (the main
//! job), `cargo run -p kvc-bench`, `cargo run -p kvc-examples --example ...` and `cargo test
//! --workspace` (the tests) must resolve every dependency they share with the same features, or
//! cargo compiles it -- and burn above it -- once per command (a fresh clone once spent 15 + 7 +
//! 5 minutes that way). When this fails, add the crate it names to `crates/workspace-hack`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Feature sets per package (`name version`, host/proc-macro builds marked) of a `cargo tree`.
fn resolved(selection: &[&str], dev: bool) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let edges = if dev { "features,normal,build,dev" } else { "features,normal,build" };
    let out = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["tree", "--offline", "--locked", "--prefix", "none", "-f", "{p}|{f}", "-e", edges])
        .args(selection)
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree {selection:?}: {}", String::from_utf8_lossy(&out.stderr));
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((package, features)) = line.split_once('|') else { continue };
        let mut words = package.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else { continue };
        if name.starts_with("kvc") || name == "workspace-hack" {
            continue; // the workspace's own crates: cheap to build, features differ on purpose
        }
        let host = if package.contains("(proc-macro)") { " (proc-macro)" } else { "" };
        let features = features.trim_end_matches(" (*)").trim().to_string();
        map.entry(format!("{name} {version}{host}")).or_default().insert(features);
    }
    assert!(map.len() > 50, "cargo tree {selection:?} listed only {} packages", map.len());
    map
}

#[test]
fn readme_commands_share_one_build_of_the_dependencies() {
    let commands = [
        ("cargo run -p kvc-cli", resolved(&["-p", "kvc-cli"], false)),
        ("cargo run -p kvc-bench", resolved(&["-p", "kvc-bench"], false)),
        ("cargo run -p kvc-examples --example", resolved(&["-p", "kvc-examples"], true)),
        ("cargo test --workspace", resolved(&["--workspace"], true)),
    ];
    let mut differ = Vec::new();
    for (i, (a, fa)) in commands.iter().enumerate() {
        for (b, fb) in &commands[i + 1..] {
            for (package, features) in fa {
                if let Some(other) = fb.get(package) {
                    if features != other {
                        differ.push(format!("{package}: `{a}` {features:?}, `{b}` {other:?}"));
                    }
                }
            }
        }
    }
    assert!(differ.is_empty(), "dependencies built with different features (add them to crates/workspace-hack):\n{}", differ.join("\n"));
}
