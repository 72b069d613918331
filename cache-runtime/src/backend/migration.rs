//! Migration files for `sqlx migrate`: a schema's install script written once per change of the schema,
//! as `<version>_cache_invalidation_<fingerprint>_v<schema version>.sql`, the version being the UTC time
//! (`YYYYMMDDHHMMSS`, as `sqlx migrate add` names files), and always above every version already in the
//! folder, so that the new file runs after the service's own migrations that are already there.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;

/// Writes `sql` into `dir` (created if missing) as the migration of the schema named by `fingerprint` and
/// `schema_version`, unless a file of that name and content is there already; returns its path.
pub(crate) fn write(
    dir: &Path,
    fingerprint: &str,
    schema_version: i32,
    sql: &str,
) -> Result<PathBuf, Error> {
    let failed = |path: &Path, source| Error::Migration {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let suffix = format!("_cache_invalidation_{fingerprint}_v{schema_version}.sql");
    let mut last = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| failed(dir, e))? {
        let path = entry.map_err(|e| failed(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        last = last.max(version_of(name).unwrap_or(0));
        if name.ends_with(&suffix) && std::fs::read_to_string(&path).is_ok_and(|s| s == sql) {
            return Ok(path);
        }
    }
    let version = utc_version(SystemTime::now()).max(last + 1);
    let path = dir.join(format!("{version}{suffix}"));
    std::fs::write(&path, sql).map_err(|e| failed(&path, e))?;
    Ok(path)
}

/// The version of a migration file name (its leading digits before `_`).
fn version_of(name: &str) -> Option<u64> {
    let (digits, _) = name.split_once('_')?;
    digits.parse().ok()
}

/// `at` as the number `YYYYMMDDHHMMSS` in UTC.
fn utc_version(at: SystemTime) -> u64 {
    let seconds = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, day_seconds) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_date(days);
    let clock = day_seconds / 3600 * 10_000 + day_seconds % 3600 / 60 * 100 + day_seconds % 60;
    (year * 10_000 + month * 100 + day) * 1_000_000 + clock
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn versions_are_utc_timestamps() {
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(utc_version(at(0)), 19_700_101_000_000);
        // 2000-02-29 23:59:59 (a leap day of a year divisible by 400).
        assert_eq!(utc_version(at(951_868_799)), 20_000_229_235_959);
        // 2026-12-03 16:20:05.
        assert_eq!(utc_version(at(1_796_314_805)), 20_261_203_162_005);
    }

    #[test]
    fn version_of_reads_leading_digits() {
        assert_eq!(version_of("20261203162005_x.sql"), Some(20_261_203_162_005));
        assert_eq!(version_of("0001_init.sql"), Some(1));
        assert_eq!(version_of("README.md"), None);
    }
}
