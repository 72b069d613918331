//! Runs `export_schema -- --migration <dir>` as a user would (issue: a file `sqlx migrate` runs): it writes
//! one timestamped migration per database, prints its path, and writes nothing when run again.

use std::path::PathBuf;
use std::process::Command;

fn export(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_export_schema"))
        .args(args)
        .output()
        .expect("run export_schema");
    assert!(
        out.status.success(),
        "export_schema {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn export_schema_writes_one_migration_file_per_database() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("export_schema_test_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_arg = dir.to_string_lossy().into_owned();
    let pg = export(&["--migration", &dir_arg]);
    assert!(pg.contains("_cache_invalidation_"), "{pg}");
    let sql = std::fs::read_to_string(&pg).expect("the printed path exists");
    assert!(sql.contains("CREATE TABLE IF NOT EXISTS cache_invalidation.outbox"));
    assert_eq!(
        export(&["--migration", &dir_arg]),
        pg,
        "run again: the same file"
    );
    let sqlite = export(&["--sqlite", "--migration", &dir_arg]);
    assert_ne!(sqlite, pg);
    let names = std::fs::read_dir(&dir).expect("dir").count();
    assert_eq!(names, 2);
    let version = |p: &str| {
        let name = std::path::Path::new(p)
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        name.split('_')
            .next()
            .expect("version")
            .parse::<u64>()
            .expect("digits")
    };
    assert!(version(&pg) >= 20_260_101_000_000, "{pg}");
    assert!(version(&sqlite) > version(&pg), "{sqlite} after {pg}");
    // Without a folder after --migration: a usage error, not a panic.
    let bad = Command::new(env!("CARGO_BIN_EXE_export_schema"))
        .arg("--migration")
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
