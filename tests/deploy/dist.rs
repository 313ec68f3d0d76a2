//! `scripts/dist.sh strip`, the step `make dist` and the Dockerfile share:
//! the shipped binary loses its symbols and debug info, still runs, and
//! points at `slipstream.debug`, which keeps them (checked on a small C
//! program built with `cc -g`, so the test needs no release build).

use std::process::Command;

use crate::root;

fn sections(file: &std::path::Path) -> String {
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(file)
        .output()
        .expect("readelf (binutils) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dist_strip_ships_a_stripped_binary_with_its_debug_info_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\nint answer(void) { return 42; }\nint main(void) { printf(\"%d\\n\", answer()); return 0; }\n",
    )
    .unwrap();
    let built = dir.path().join("built");
    let cc = Command::new("cc")
        .args(["-g", "-O0", "-o"])
        .arg(&built)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(cc.success());
    let before = sections(&built);
    assert!(before.contains(".debug_info") && before.contains(".symtab"));

    let out = dir.path().join("out");
    let status = Command::new(root().join("scripts/dist.sh"))
        .arg("strip")
        .arg(&built)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "scripts/dist.sh strip failed");

    let shipped = out.join("slipstream");
    let debug = out.join("slipstream.debug");
    let stripped = sections(&shipped);
    for gone in [".debug_info", ".debug_line", ".symtab", ".strtab"] {
        assert!(
            !stripped.contains(gone),
            "{gone} left in the shipped binary:\n{stripped}"
        );
    }
    assert!(stripped.contains(".gnu_debuglink"));
    let link = Command::new("readelf")
        .args(["--string-dump=.gnu_debuglink"])
        .arg(&shipped)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains("slipstream.debug"));
    let kept = sections(&debug);
    assert!(
        kept.contains(".debug_info") && kept.contains(".debug_line") && kept.contains(".symtab")
    );
    assert!(std::fs::metadata(&shipped).unwrap().len() < std::fs::metadata(&built).unwrap().len());

    // The stripped binary runs, and the debug file maps its code to lines.
    let run = Command::new(&shipped).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "42");
    let nm = Command::new("nm").arg(&debug).output().unwrap();
    let nm = String::from_utf8(nm.stdout).unwrap();
    let addr = nm
        .lines()
        .find(|l| l.ends_with(" answer"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the debug file has the symbol");
    let line = Command::new("addr2line")
        .arg("-e")
        .arg(&debug)
        .arg(format!("0x{addr}"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&line.stdout).contains("hello.c:2"),
        "{}",
        String::from_utf8_lossy(&line.stdout)
    );
}
