//! The SQL text of every operation, built once per store for its table name.
//!
//! Each operation is **one statement**. Statements that change a record also read the row as it
//! was in the statement's snapshot (`cur`), so one round trip both applies the change and says
//! why it was not applied. Times are judged by `statement_timestamp()`: the database's clock,
//! fixed for the whole statement (and, unlike `now()`, not frozen at the start of an enclosing
//! application transaction).

use std::sync::Arc;

/// Advisory-lock class for schema migrations (first key of the two-key form).
pub(crate) const LOCK_MIGRATE: i32 = 0x1de9_0001;
/// Advisory-lock class for the reaper.
pub(crate) const LOCK_REAPER: i32 = 0x1de9_0002;

/// Record states in the `state` column.
pub(crate) const STATE_IN_FLIGHT: i16 = 1;
/// See [`STATE_IN_FLIGHT`].
pub(crate) const STATE_COMPLETED: i16 = 2;

/// A validated, possibly schema-qualified table name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Parses `name` or `schema.name`; each part is `[A-Za-z_][A-Za-z0-9_]*`, at most 48
    /// characters (so that derived index and table names stay under PostgreSQL's 63).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let valid = |p: &str| {
            !p.is_empty()
                && p.len() <= 48
                && p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let mut parts = s.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(n), None, None) => (None, n),
            (Some(sc), Some(n), None) => (Some(sc), n),
            _ => return None,
        };
        if !valid(name) || !schema.is_none_or(valid) {
            return None;
        }
        Some(TableName {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The quoted, qualified name of this table with `suffix` appended to its name.
    pub(crate) fn quoted_with(&self, suffix: &str) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{}{suffix}\"", self.name),
            None => format!("\"{}{suffix}\"", self.name),
        }
    }

    /// The quoted, qualified table name.
    pub(crate) fn quoted(&self) -> String {
        self.quoted_with("")
    }

    /// The bare (unqualified) name, for naming indexes.
    pub(crate) fn bare(&self) -> &str {
        &self.name
    }

    /// The name as given (`schema.name` or `name`), for advisory-lock keys and messages.
    pub(crate) fn display(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch of a `timestamptz` expression, floored.
fn ms(expr: &str) -> String {
    format!("floor(extract(epoch FROM {expr}) * 1000)::bigint")
}

/// The record columns every statement returns, read from row alias `a`, in the order
/// [`crate::store::RowFields`] reads them.
fn row_cols(a: &str) -> String {
    format!(
        "{a}.state, {a}.fingerprint, {a}.token, {lease} AS lease_ms, {a}.holder, \
         {a}.origin_token, {a}.outcome, {exp} AS expires_ms, \
         ({a}.expires_at <= statement_timestamp()) AS expired, \
         ({a}.lease_expires_at <= statement_timestamp()) AS lapsed",
        lease = ms(&format!("{a}.lease_expires_at")),
        exp = ms(&format!("{a}.expires_at")),
    )
}

/// Whether the row under alias `a` is one this build can read, as far as SQL can tell: the
/// right state, field lengths, and an outcome whose format-version byte this build accepts.
/// Statements never overwrite a row that fails it (it stays `Corrupt` until an operator
/// deletes it), so garbage is never treated as absent or as this token's own record.
fn readable(a: &str) -> String {
    let v = idemgate::record::FORMAT_VERSION;
    let mut versions = format!("'\\x{v:02x}'::bytea");
    if v > 1 {
        versions.push_str(&format!(", '\\x{:02x}'::bytea", v - 1));
    }
    format!(
        "(octet_length({a}.fingerprint) = 32 AND ( \
           ({a}.state = 1 AND octet_length({a}.token) = 16 \
            AND {a}.lease_expires_at IS NOT NULL AND {a}.holder IS NOT NULL) \
        OR ({a}.state = 2 AND octet_length({a}.origin_token) = 16 AND {a}.expires_at IS NOT NULL \
            AND substring({a}.outcome FROM 1 FOR 1) IN ({versions}))))"
    )
}

/// The statements of one store. `Arc<str>` so each use is a cheap clone (sqlx wants owned SQL).
#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) acquire: Arc<str>,
    pub(crate) renew: Arc<str>,
    pub(crate) mark_watched: Arc<str>,
    pub(crate) complete: Arc<str>,
    pub(crate) settle: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) get: Arc<str>,
    pub(crate) delete: Arc<str>,
    pub(crate) resolve_release: Arc<str>,
    pub(crate) resolve_respond: Arc<str>,
    pub(crate) purge_batch_try: Arc<str>,
    pub(crate) purge_batch_wait: Arc<str>,
    pub(crate) count_capped: Arc<str>,
}

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.quoted();
        let cur = row_cols("c");
        let ok_r = readable("r");
        let now_plus =
            |p: &str| format!("statement_timestamp() + {p}::bigint * interval '1 millisecond'");

        // acquire: $1 id, $2 fingerprint, $3 token, $4 lease ms, $5 holder,
        // $6 lapsed lease becomes outcome-unknown (else re-execute), $7 placeholder outcome
        // bytes, $8 retention ms, $9 whether a new record may be written (capacity).
        //
        // `cur` is the row in the statement's snapshot. A write is due only when it is absent,
        // Completed past expiry, or InFlight of another token with a lapsed lease (then either a
        // fresh InFlight or the outcome-unknown placeholder). Every other row (a live Completed
        // record: a replay or a mismatch; InFlight of this token; InFlight of another token with
        // a live lease; an unreadable row) is answered from `cur` alone, and `ins` then has no
        // source row and does nothing at all. That matters: `INSERT … ON CONFLICT DO UPDATE`
        // locks the conflicting row even when its `WHERE` rejects the update, which assigns a
        // transaction id, writes a heap-lock WAL record and makes the commit flush the WAL: an
        // fsync per replay. A pure read assigns no transaction id and writes no WAL.
        //
        // When `cur` says a write is due, ON CONFLICT judges the newest committed version of the
        // row (locked) by the same rule. If `ins` wrote nothing, the row changed between the
        // snapshot and the write (a race) or the capacity bound stopped it: the answer comes
        // from `cur`, which says a write was due, so the caller runs the statement again (or
        // reports `Full`). A row that appears after the snapshot is such a race too: the
        // insert meets it on the unique index and goes through ON CONFLICT.
        let lapse = "(r.state = 1 AND $6)";
        // Whether the row under alias `a` must be rewritten: judged on the snapshot row `c` to
        // decide whether to try the insert at all, and on the newest version `r` in ON CONFLICT.
        let due = |a: &str| {
            format!(
                "(({a}.state = 2 AND {a}.expires_at <= statement_timestamp()) \
                  OR ({a}.state = 1 AND {a}.token IS DISTINCT FROM $3 \
                      AND {a}.lease_expires_at <= statement_timestamp()))"
            )
        };
        let acquire = format!(
            "WITH cur AS (SELECT * FROM {t} WHERE id = $1), \
             ins AS ( \
               INSERT INTO {t} AS r (id, state, fingerprint, token, lease_expires_at, holder, \
                                     origin_token, outcome, outcome_unknown, expires_at) \
               SELECT $1, 1::smallint, $2, $3, {lease}, $5, NULL::bytea, NULL::bytea, false, {inflight_exp} \
               WHERE $9 \
                 AND NOT EXISTS (SELECT 1 FROM cur c WHERE ({due_c} AND {ok_c}) IS NOT TRUE) \
               ON CONFLICT (id) DO UPDATE SET \
                 state = CASE WHEN {lapse} THEN 2 ELSE 1 END, \
                 fingerprint = CASE WHEN {lapse} THEN r.fingerprint ELSE excluded.fingerprint END, \
                 token = CASE WHEN {lapse} THEN NULL ELSE excluded.token END, \
                 lease_expires_at = CASE WHEN {lapse} THEN NULL ELSE excluded.lease_expires_at END, \
                 holder = CASE WHEN {lapse} THEN NULL ELSE excluded.holder END, \
                 origin_token = CASE WHEN {lapse} THEN r.token ELSE NULL END, \
                 outcome = CASE WHEN {lapse} THEN $7 ELSE NULL END, \
                 outcome_unknown = {lapse}, \
                 expires_at = CASE WHEN {lapse} THEN {placeholder_exp} ELSE excluded.expires_at END \
               WHERE {due_r} AND {ok_r} \
               RETURNING r.* \
             ) \
             SELECT true AS written, {ins_cols} FROM ins c \
             UNION ALL \
             SELECT false, {cur} FROM cur c WHERE NOT EXISTS (SELECT 1 FROM ins)",
            lease = now_plus("$4"),
            inflight_exp =
                "statement_timestamp() + ($4::bigint + $8::bigint) * interval '1 millisecond'",
            placeholder_exp = now_plus("$8"),
            ins_cols = row_cols("c"),
            due_c = due("c"),
            ok_c = readable("c"),
            due_r = due("r"),
        );

        // renew: $1 id, $2 token, $3 lease ms. The in-flight retention bound (`expires_at`)
        // moves with the lease.
        let renew = format!(
            "WITH up AS ( \
               UPDATE {t} AS r SET lease_expires_at = {lease}, \
                 expires_at = r.expires_at + ({lease} - r.lease_expires_at) \
               WHERE r.id = $1 AND r.state = 1 AND r.token = $2 AND {ok_r} \
               RETURNING {lease_ms} AS lease_ms \
             ) \
             SELECT (SELECT lease_ms FROM up) AS renewed_ms, {cur} \
             FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.id = $1",
            lease = now_plus("$3"),
            lease_ms = ms("lease_expires_at"),
        );

        // Change statements notify waiters only when one has marked the row (`watched`, set by
        // `mark_watched` below). Why: a transaction that has called `pg_notify` takes a lock
        // at commit that every notifying transaction in the database shares and holds it
        // across its WAL flush, so notifying commits never share a flush. Notifying on every
        // `complete` made each fresh request wait for a flush of its own (~2.5x fewer commits
        // per second at 32 clients, measured with pgbench). Nobody waits on most keys.
        //
        // mark_watched: $1 id. A waiter marks an in-flight row after subscribing and before
        // re-reading it. Row locks order it against the change statements: a change that
        // comes after the mark sees `watched` and notifies; one that came before is what the
        // re-read finds. The mark stays with the row (an acquire that replaces the row keeps
        // it), so a waiter whose row was taken over is still woken by the new attempt's end.
        let mark_watched =
            format!("UPDATE {t} SET watched = true WHERE id = $1 AND state = 1 AND NOT watched");

        // complete: $1 id, $2 token, $3 outcome bytes, $4 ttl ms, $5 outcome is outcome-unknown,
        // $6 channel, $7 hex id. Fencing as `may_complete`: InFlight(token), or Completed whose
        // origin is token (its own earlier write or the placeholder of its lapsed lease).
        // Absent is `Stored` with nothing written: there is no fingerprint to write a record
        // with, and nobody else owns the key.
        let complete = format!(
            "WITH up AS ( \
               UPDATE {t} AS r SET state = 2, token = NULL, lease_expires_at = NULL, holder = NULL, \
                 origin_token = $2, outcome = $3, outcome_unknown = $5, expires_at = {exp} \
               WHERE r.id = $1 AND {ok_r} \
                 AND ((r.state = 1 AND r.token = $2) OR (r.state = 2 AND r.origin_token = $2)) \
               RETURNING r.watched \
             ), n AS (SELECT pg_notify($6, $7) FROM up WHERE up.watched) \
             SELECT (SELECT count(*) FROM up) AS changed, (SELECT count(*) FROM n) AS notified, \
               {cur} \
             FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.id = $1",
            exp = now_plus("$4"),
        );

        // settle (transactional mode, inside the application's transaction): $1 id, $2 token,
        // $3 outcome bytes, $4 ttl ms, $5 channel, $6 hex id, $7 the settled origin token.
        // Stricter than `complete`: only InFlight(token) qualifies (absent, a placeholder or an
        // earlier outcome all mean the lease was lost). The origin token written is not the
        // attempt's own, so no later `complete` by that token (e.g. a write-off that waited on
        // this row's lock) can replace an outcome that committed with the application's writes.
        let settle = format!(
            "WITH up AS ( \
               UPDATE {t} AS r SET state = 2, token = NULL, lease_expires_at = NULL, holder = NULL, \
                 origin_token = $7, outcome = $3, outcome_unknown = false, expires_at = {exp} \
               WHERE r.id = $1 AND r.state = 1 AND r.token = $2 AND {ok_r} \
               RETURNING r.watched \
             ), n AS (SELECT pg_notify($5, $6) FROM up WHERE up.watched) \
             SELECT (SELECT count(*) FROM up) AS changed, (SELECT count(*) FROM n) AS notified",
            exp = now_plus("$4"),
        );

        // release: $1 id, $2 token, $3 channel, $4 hex id.
        let release = format!(
            "WITH del AS (DELETE FROM {t} AS r \
                          WHERE r.id = $1 AND r.state = 1 AND r.token = $2 AND {ok_r} \
                          RETURNING r.watched), \
             n AS (SELECT pg_notify($3, $4) FROM del WHERE del.watched) \
             SELECT (SELECT count(*) FROM del) AS changed, (SELECT count(*) FROM n) AS notified, \
               {cur} \
             FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.id = $1"
        );

        let get = format!("SELECT {cur} FROM {t} c WHERE c.id = $1");

        // delete: $1 id, $2 force, $3 channel, $4 hex id. Works on rows of any (even unknown)
        // state, so an operator can remove an unreadable record.
        let delete = format!(
            "WITH del AS (DELETE FROM {t} WHERE id = $1 AND (state <> 1 OR $2) RETURNING watched), \
             n AS (SELECT pg_notify($3, $4) FROM del WHERE del.watched) \
             SELECT (SELECT count(*) FROM del) AS changed, (SELECT count(*) FROM n) AS notified, \
               {cur} \
             FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.id = $1"
        );

        // resolve: $1 id, $2 channel, $3 hex id.
        let resolve_release = format!(
            "WITH del AS (DELETE FROM {t} AS r \
                          WHERE r.id = $1 AND r.state = 2 AND r.outcome_unknown AND {ok_r} \
                          RETURNING r.watched), \
             n AS (SELECT pg_notify($2, $3) FROM del WHERE del.watched) \
             SELECT (SELECT count(*) FROM del) AS changed, (SELECT count(*) FROM n) AS notified, \
               {cur} \
             FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.id = $1"
        );
        // resolve: $1 id, $2 channel, $3 hex id, $4 outcome bytes, $5 outcome is outcome-unknown,
        // $6 ttl ms, $7 a fresh origin token: the operator's answer is final, so the lapsed
        // holder's late `complete` (which matches on origin_token) is fenced.
        let resolve_respond = format!(
            "WITH up AS (UPDATE {t} AS r SET outcome = $4, outcome_unknown = $5, expires_at = {exp}, \
                           origin_token = $7 \
                         WHERE r.id = $1 AND r.state = 2 AND r.outcome_unknown AND {ok_r} \
                         RETURNING r.watched), \
             n AS (SELECT pg_notify($2, $3) FROM up WHERE up.watched) \
             SELECT (SELECT count(*) FROM up) AS changed, (SELECT count(*) FROM n) AS notified, \
               {cur} \
             FROM (SELECT 1) AS one LEFT JOIN {t} c ON c.id = $1",
            exp = now_plus("$6"),
        );

        // One reaper batch: $1 lock key (the table name), $2 batch size. Deletes rows whose
        // `expires_at` passed: Completed records past retention, and InFlight records whose
        // lease lapsed longer than the retention ago (their holder died and nobody retried).
        // The advisory lock is transaction-scoped, so it is released when this statement's
        // implicit transaction ends (and works behind a transaction-pooling PgBouncer).
        let purge = |lock: &str| {
            format!(
                "WITH lock AS MATERIALIZED ({lock}), \
                 victims AS ( \
                   SELECT id FROM {t} \
                   WHERE expires_at <= statement_timestamp() AND (SELECT got FROM lock) \
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED \
                 ), \
                 del AS (DELETE FROM {t} WHERE id IN (SELECT id FROM victims) RETURNING 1) \
                 SELECT (SELECT got FROM lock) AS got, (SELECT count(*) FROM del) AS deleted"
            )
        };

        // Capacity: rows counted up to the bound ($1), so the check costs at most O(bound).
        let count_capped = format!("SELECT count(*) FROM (SELECT 1 FROM {t} LIMIT $1) AS s");

        Statements {
            acquire: acquire.into(),
            renew: renew.into(),
            mark_watched: mark_watched.into(),
            complete: complete.into(),
            settle: settle.into(),
            release: release.into(),
            get: get.into(),
            delete: delete.into(),
            resolve_release: resolve_release.into(),
            resolve_respond: resolve_respond.into(),
            purge_batch_try: purge(&format!(
                "SELECT pg_try_advisory_xact_lock({LOCK_REAPER}, hashtext($1)) AS got"
            ))
            .into(),
            // Waits (bounded by statement_timeout) for another instance's batch to finish.
            purge_batch_wait: purge(&format!(
                "SELECT true AS got FROM (SELECT pg_advisory_xact_lock({LOCK_REAPER}, hashtext($1))) AS l"
            ))
            .into(),
            count_capped: count_capped.into(),
        }
    }
}

/// The schema migrations, applied in order under an advisory lock. Each entry is one version;
/// `{t}` stands for the quoted table, `{idx}` for the bare table name used in index names.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the records table.
    "CREATE TABLE IF NOT EXISTS {t} ( \
       id bytea PRIMARY KEY, \
       state smallint NOT NULL, \
       fingerprint bytea NOT NULL, \
       token bytea, \
       lease_expires_at timestamptz, \
       holder bigint, \
       origin_token bytea, \
       outcome bytea, \
       outcome_unknown boolean NOT NULL DEFAULT false, \
       expires_at timestamptz \
     ); \
     CREATE INDEX IF NOT EXISTS \"{idx}_expires_at\" ON {t} (expires_at); \
     COMMENT ON TABLE {t} IS 'idemgate idempotency records (state 1 = in flight, 2 = completed)'",
    // 2: a waiter's mark, so that only changes someone waits for send a NOTIFY. A constant
    // default makes this a catalog change: no table rewrite, whatever the table's size.
    "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS watched boolean NOT NULL DEFAULT false",
];
