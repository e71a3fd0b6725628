//! `STUDY/study.sqlite`: the study's one database (SQLite in WAL mode with full sync, so an
//! answer the server acknowledged survives a killed process), its schema and the queries the
//! server and the report share.
//!
//! Raters see only random public ids (`tasks.public_id` for a comparison, `images.public_id`
//! for an image file); method names, run folders and seeds stay in here.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::{StudyError, bail};

/// The database's file name inside the study folder.
pub const DB_FILE: &str = "study.sqlite";
/// The folder of the re-encoded images inside the study folder.
pub const IMAGES_DIR: &str = "images";
/// Bumped when the schema changes; a study of another version is refused.
pub const SCHEMA_VERSION: &str = "1";

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- One compared method: a --runs folder and the method name its manifests give.
CREATE TABLE methods(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, run_dir TEXT NOT NULL);
-- One comparison: a prompt and seed present in every run (pair: the object pair or the prompt).
CREATE TABLE items(id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
                   pair TEXT NOT NULL, UNIQUE(prompt, seed));
-- A method's image of a comparison, copied to images/<public_id>.png without metadata.
CREATE TABLE images(id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
                    method_id INTEGER NOT NULL REFERENCES methods(id),
                    public_id TEXT NOT NULL UNIQUE, source TEXT NOT NULL,
                    UNIQUE(item_id, method_id));
CREATE TABLE raters(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token TEXT NOT NULL UNIQUE);
-- What a rater sees, in order: a comparison (again, for repeat_of), its methods placed in
-- slots A, B, ..., Z, AA, AB, ... (placement: JSON array of method ids, slot order).
CREATE TABLE tasks(id INTEGER PRIMARY KEY, rater_id INTEGER NOT NULL REFERENCES raters(id),
                   position INTEGER NOT NULL, item_id INTEGER NOT NULL REFERENCES items(id),
                   repeat_of INTEGER REFERENCES tasks(id), public_id TEXT NOT NULL UNIQUE,
                   placement TEXT NOT NULL, UNIQUE(rater_id, position));
-- A rating of one slot of a task; a re-sent answer replaces the task's rows.
CREATE TABLE answers(task_id INTEGER NOT NULL REFERENCES tasks(id), slot INTEGER NOT NULL,
                     alignment INTEGER NOT NULL CHECK(alignment BETWEEN 1 AND 5),
                     fidelity INTEGER NOT NULL CHECK(fidelity BETWEEN 1 AND 5),
                     answered_at TEXT NOT NULL, PRIMARY KEY(task_id, slot));
";

/// Creates the database at `path` with the schema (the file must not exist).
pub fn create(path: &Path) -> Result<Connection, StudyError> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    conn.execute_batch(SCHEMA)?;
    conn.execute(
        "INSERT INTO meta(key, value) VALUES('schema_version', ?1)",
        [SCHEMA_VERSION],
    )?;
    Ok(conn)
}

/// Opens the study in `dir` (its `study.sqlite`), refusing a folder that is not a study.
pub fn open(dir: &Path) -> Result<Connection, StudyError> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        bail!(
            "{} is not a study: it has no {DB_FILE}; make one with `decorr study create --runs \
             DIR... --out {}`",
            dir.display(),
            dir.display()
        );
    }
    let conn = Connection::open(&path)?;
    configure(&conn)?;
    let version = meta(&conn, "schema_version")
        .ok()
        .flatten()
        .unwrap_or_default();
    if version != SCHEMA_VERSION {
        bail!(
            "{} was made by another version of decorr (schema {version:?}, this one reads \
             {SCHEMA_VERSION}); use the decorr that created it",
            path.display()
        );
    }
    Ok(conn)
}

/// WAL (readers do not block the writer), full sync (a commit is on disk before the server
/// answers), foreign keys on, and a wait instead of an error when another connection writes.
fn configure(conn: &Connection) -> Result<(), StudyError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(())
}

/// A `meta` value.
pub fn meta(conn: &Connection, key: &str) -> Result<Option<String>, StudyError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// A task as the rating page shows it.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: i64,
    pub public_id: String,
    /// 1-based.
    pub position: i64,
    pub prompt: String,
    /// The image public ids in slot order (A, B, ...).
    pub images: Vec<String>,
}

/// One rating of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rating {
    pub slot: usize,
    pub alignment: u8,
    pub fidelity: u8,
}

/// The rater's id for `token`.
pub fn rater_of(conn: &Connection, token: &str) -> Result<Option<i64>, StudyError> {
    Ok(conn
        .query_row("SELECT id FROM raters WHERE token = ?1", [token], |r| {
            r.get(0)
        })
        .optional()?)
}

/// The rater's number of tasks and of answered ones (every slot rated).
pub fn progress(conn: &Connection, rater: i64) -> Result<(i64, i64), StudyError> {
    let total: i64 = conn.query_row(
        "SELECT COUNT(*) FROM tasks WHERE rater_id = ?1",
        [rater],
        |r| r.get(0),
    )?;
    let done: i64 = conn.query_row(
        "SELECT COUNT(*) FROM tasks t WHERE t.rater_id = ?1 AND
           (SELECT COUNT(*) FROM answers a WHERE a.task_id = t.id) = json_array_length(t.placement)",
        [rater],
        |r| r.get(0),
    )?;
    Ok((total, done))
}

fn task_from(conn: &Connection, id: i64) -> Result<Task, StudyError> {
    let (public_id, position, prompt, placement, item): (String, i64, String, String, i64) = conn
        .query_row(
        "SELECT t.public_id, t.position, i.prompt, t.placement, t.item_id
             FROM tasks t JOIN items i ON i.id = t.item_id WHERE t.id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    let methods: Vec<i64> = serde_json::from_str(&placement)?;
    let mut images = Vec::with_capacity(methods.len());
    for m in methods {
        images.push(conn.query_row(
            "SELECT public_id FROM images WHERE item_id = ?1 AND method_id = ?2",
            params![item, m],
            |r| r.get(0),
        )?);
    }
    Ok(Task {
        id,
        public_id,
        position,
        prompt,
        images,
    })
}

/// The rater's first task (by position) not fully answered, or `None` when all are.
pub fn next_task(conn: &Connection, rater: i64) -> Result<Option<Task>, StudyError> {
    let id: Option<i64> = conn
        .query_row(
            "SELECT t.id FROM tasks t WHERE t.rater_id = ?1 AND
               (SELECT COUNT(*) FROM answers a WHERE a.task_id = t.id) < json_array_length(t.placement)
             ORDER BY t.position LIMIT 1",
            [rater],
            |r| r.get(0),
        )
        .optional()?;
    id.map(|id| task_from(conn, id)).transpose()
}

/// The rater's task at `position` (1-based).
pub fn task_at(conn: &Connection, rater: i64, position: i64) -> Result<Option<Task>, StudyError> {
    let id: Option<i64> = conn
        .query_row(
            "SELECT id FROM tasks WHERE rater_id = ?1 AND position = ?2",
            params![rater, position],
            |r| r.get(0),
        )
        .optional()?;
    id.map(|id| task_from(conn, id)).transpose()
}

/// The rater's task with this public id.
pub fn task_by_public(
    conn: &Connection,
    rater: i64,
    public_id: &str,
) -> Result<Option<Task>, StudyError> {
    let id: Option<i64> = conn
        .query_row(
            "SELECT id FROM tasks WHERE rater_id = ?1 AND public_id = ?2",
            params![rater, public_id],
            |r| r.get(0),
        )
        .optional()?;
    id.map(|id| task_from(conn, id)).transpose()
}

/// The ratings already given for a task, by slot.
pub fn ratings(conn: &Connection, task: i64) -> Result<Vec<Rating>, StudyError> {
    let mut st = conn.prepare(
        "SELECT slot, alignment, fidelity FROM answers WHERE task_id = ?1 ORDER BY slot",
    )?;
    let rows = st.query_map([task], |r| {
        Ok(Rating {
            slot: r.get::<_, i64>(0)? as usize,
            alignment: r.get(1)?,
            fidelity: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Replaces a task's answer with `ratings` (one per slot), committed before returning.
pub fn save_answer(conn: &mut Connection, task: i64, ratings: &[Rating]) -> Result<(), StudyError> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM answers WHERE task_id = ?1", [task])?;
    let now = now_utc();
    for r in ratings {
        tx.execute(
            "INSERT INTO answers(task_id, slot, alignment, fidelity, answered_at)
             VALUES(?1, ?2, ?3, ?4, ?5)",
            params![task, r.slot as i64, r.alignment, r.fidelity, now],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Whether `image` (a public id) belongs to one of the rater's tasks.
pub fn rater_sees_image(conn: &Connection, rater: i64, image: &str) -> Result<bool, StudyError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM images im JOIN tasks t ON t.item_id = im.item_id
             WHERE t.rater_id = ?1 AND im.public_id = ?2 LIMIT 1",
            params![rater, image],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The public id of every image (its file is `images/<id>.png`).
pub fn image_ids(conn: &Connection) -> Result<Vec<String>, StudyError> {
    let mut st = conn.prepare("SELECT public_id FROM images ORDER BY id")?;
    let ids = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(ids)
}

/// Every rater with their progress: (name, token, done, total).
pub fn raters(conn: &Connection) -> Result<Vec<(String, String, i64, i64)>, StudyError> {
    let mut st = conn.prepare("SELECT id, name, token FROM raters ORDER BY id")?;
    let rows: Vec<(i64, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, name, token) in rows {
        let (total, done) = progress(conn, id)?;
        out.push((name, token, done, total));
    }
    Ok(out)
}

/// One answered slot with everything the report and the CSV export need.
#[derive(Debug, Clone)]
pub struct AnswerRow {
    pub rater: String,
    pub position: i64,
    pub item: i64,
    pub prompt: String,
    pub seed: i64,
    pub pair: String,
    /// A repeated showing of a comparison the rater saw earlier (for consistency).
    pub is_repeat: bool,
    pub slot: usize,
    pub method: String,
    pub alignment: u8,
    pub fidelity: u8,
    pub answered_at: String,
}

/// Every answer, in rater and position order, with the method each slot showed.
pub fn answers(conn: &Connection) -> Result<Vec<AnswerRow>, StudyError> {
    let methods: std::collections::HashMap<i64, String> = {
        let mut st = conn.prepare("SELECT id, name FROM methods")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut st = conn.prepare(
        "SELECT r.name, t.position, i.id, i.prompt, i.seed, i.pair, t.repeat_of, t.placement,
                a.slot, a.alignment, a.fidelity, a.answered_at
         FROM answers a JOIN tasks t ON t.id = a.task_id JOIN raters r ON r.id = t.rater_id
              JOIN items i ON i.id = t.item_id
         ORDER BY r.id, t.position, a.slot",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, i64>(8)?,
            r.get::<_, u8>(9)?,
            r.get::<_, u8>(10)?,
            r.get::<_, String>(11)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (rater, position, item, prompt, seed, pair, repeat_of, placement, slot, al, fi, at) =
            row?;
        let placement: Vec<i64> = serde_json::from_str(&placement)?;
        let method = placement
            .get(slot as usize)
            .and_then(|m| methods.get(m))
            .cloned()
            .unwrap_or_default();
        out.push(AnswerRow {
            rater,
            position,
            item,
            prompt,
            seed,
            pair,
            is_repeat: repeat_of.is_some(),
            slot: slot as usize,
            method,
            alignment: al,
            fidelity: fi,
            answered_at: at,
        });
    }
    Ok(out)
}

/// The methods in id order (their names as the manifests give them).
pub fn method_names(conn: &Connection) -> Result<Vec<String>, StudyError> {
    let mut st = conn.prepare("SELECT name FROM methods ORDER BY id")?;
    let names = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(names)
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
