//! Embeds the SQL files of `../migrations` (named `NNNN_name.sql`) into the binary, in order.

use std::fmt::Write as _;

fn main() {
    // Read at run time, not with env!(): a build script binary compiled for one checkout is
    // reused by cargo for another checkout sharing the target directory (CI's clean clone).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR set by cargo");
    let dir = std::path::Path::new(&manifest_dir).join("../migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("migrations directory exists")
        .map(|entry| entry.expect("readable migrations directory").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    let mut out = String::from("&[\n");
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let file_name = path.file_name().expect("file name").to_string_lossy().to_string();
        let (version, _) = file_name
            .split_once('_')
            .expect("migration files are named NNNN_name.sql");
        let version: i64 = version.parse().expect("migration file names start with a number");
        writeln!(
            out,
            "    Migration {{ version: {version}, name: {file_name:?}, sql: include_str!({:?}) }},",
            path.canonicalize().expect("canonical path").display().to_string()
        )
        .expect("write to string");
    }
    out.push(']');
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR set by cargo");
    std::fs::write(std::path::Path::new(&out_dir).join("migrations.rs"), out).expect("write migrations.rs");
}
