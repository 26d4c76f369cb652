//! The conformance cases (SPEC §4). Each is a pub async fn taking the backend's [`Harness`];
//! [`conformance_tests!`](crate::conformance_tests) turns each into a named test.
//!
//! Every case works on fresh random record ids, so a backend whose "fresh" stores share a
//! server still cannot see one case's records from another. Each assertion names the rule it
//! checks, so a failure reads as the broken rule.

// A failing case must panic with the broken rule; the suite is test code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idemgate::record::{
    Completed, Fingerprint, InFlight, Outcome, Record, RecordId, ResponseHead, StoredProblemKind,
    Timestamp, Token,
};
use idemgate::store::{
    Acquire, AcquireRequest, Completion, Deletion, LeaseExpiry, Release, Renewal, Resolution,
    Resolved, Store, StoreError,
};

use crate::{Harness, LONG_LEASE};

/// Retention for records that must outlive the case.
const TTL: Duration = Duration::from_secs(3600);
/// Retention for records the case watches expire.
const SHORT_TTL: Duration = Duration::from_secs(1);
/// How long past `SHORT_TTL` the case waits before expecting the record gone.
const EXPIRY_WAIT: Duration = Duration::from_millis(1400);
/// Tolerance between this process's clock and the store's (servers run on this host).
const CLOCK_SLACK: Duration = Duration::from_secs(2);
/// How long a watch may take to fire.
const WATCH_DEADLINE: Duration = Duration::from_secs(2);

fn new_id() -> RecordId {
    RecordId::derive("conformance", b"suite", &Token::random().0)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn req(id: RecordId, fingerprint: Fingerprint, token: Token) -> AcquireRequest {
    AcquireRequest {
        id,
        fingerprint,
        token,
        lease: LONG_LEASE,
        on_lease_expiry: LeaseExpiry::OutcomeUnknown,
        retention: TTL,
    }
}

fn req_lease(
    id: RecordId,
    fingerprint: Fingerprint,
    token: Token,
    lease: Duration,
) -> AcquireRequest {
    AcquireRequest {
        lease,
        ..req(id, fingerprint, token)
    }
}

/// A response with repeated header names (kept in order) and a non-UTF-8 header value.
fn sample_outcome() -> Outcome {
    Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![
                ("location".into(), Bytes::from_static(b"/orders/42")),
                ("link".into(), Bytes::from_static(b"</a>; rel=a")),
                (
                    "x-raw".into(),
                    Bytes::from_static(&[0xff, 0x00, 0x80, 0xfe]),
                ),
                ("link".into(), Bytes::from_static(b"</b>; rel=b")),
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
            ],
        },
        body: Bytes::from_static(b"{\"id\":42,\"status\":\"created\"}"),
    }
}

fn ok<T, E: Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected store error {e:?}"),
    }
}

fn assert_within(t: Timestamp, before: Timestamp, after: Timestamp, plus: Duration, what: &str) {
    let lo = Timestamp(
        before
            .after(plus)
            .0
            .saturating_sub(CLOCK_SLACK.as_millis() as u64),
    );
    let hi = after.after(plus).after(CLOCK_SLACK);
    assert!(
        lo <= t && t <= hi,
        "{what}: {t:?} is not about now + {plus:?} (expected within [{lo:?}, {hi:?}])"
    );
}

async fn acquired<S: Store>(s: &S, r: AcquireRequest, what: &str) -> Timestamp {
    match ok(s.acquire(r).await, what) {
        Acquire::Acquired { lease_expires_at } => lease_expires_at,
        other => panic!("{what}: expected Acquired, got {other:?}"),
    }
}

async fn in_flight<S: Store>(s: &S, r: AcquireRequest, what: &str) -> Timestamp {
    match ok(s.acquire(r).await, what) {
        Acquire::InFlight { lease_expires_at } => lease_expires_at,
        other => panic!("{what}: expected InFlight, got {other:?}"),
    }
}

async fn replayed<S: Store>(s: &S, r: AcquireRequest, what: &str) -> Completed {
    match ok(s.acquire(r).await, what) {
        Acquire::Completed(c) => *c,
        other => panic!("{what}: expected Completed, got {other:?}"),
    }
}

async fn mismatch<S: Store>(s: &S, r: AcquireRequest, what: &str) {
    let a = ok(s.acquire(r).await, what);
    assert_eq!(a, Acquire::Mismatch, "{what}: expected Mismatch");
}

async fn stored<S: Store>(s: &S, id: &RecordId, token: Token, outcome: &Outcome, what: &str) {
    let c = ok(s.complete(id, token, outcome, TTL).await, what);
    assert_eq!(c, Completion::Stored, "{what}: expected Stored");
}

async fn get_in_flight<S: Store>(s: &S, id: &RecordId, what: &str) -> InFlight {
    match ok(s.get(id).await, what) {
        Some(Record::InFlight(f)) => f,
        other => panic!("{what}: expected an InFlight record, got {other:?}"),
    }
}

async fn get_completed<S: Store>(s: &S, id: &RecordId, what: &str) -> Completed {
    match ok(s.get(id).await, what) {
        Some(Record::Completed(c)) => c,
        other => panic!("{what}: expected a Completed record, got {other:?}"),
    }
}

async fn get_absent<S: Store>(s: &S, id: &RecordId, what: &str) {
    let r = ok(s.get(id).await, what);
    assert!(r.is_none(), "{what}: expected no record, got {r:?}");
}

fn assert_placeholder(c: &Completed, fingerprint: Fingerprint, origin: Token, what: &str) {
    assert!(
        c.outcome.is_outcome_unknown(),
        "{what}: expected the outcome-unknown placeholder, got {:?}",
        c.outcome
    );
    assert_eq!(
        c.fingerprint, fingerprint,
        "{what}: placeholder keeps the fingerprint"
    );
    assert_eq!(
        c.origin_token, origin,
        "{what}: placeholder's origin_token is the lapsed holder's"
    );
}

/// Makes `placeholders` (each acquired with the harness lease by its token) lapse and turns each
/// into its outcome-unknown placeholder by another token's `acquire`. Returns the store.
async fn lapse_into_placeholders<H: Harness>(
    h: &H,
    s: H::Store,
    placeholders: &[(RecordId, Fingerprint, Token)],
) -> H::Store {
    let s = h.lapse_leases(s, h.lease()).await;
    for (id, f, holder) in placeholders {
        let c = replayed(&s, req(*id, *f, Token::random()), "acquire after lapse").await;
        assert_placeholder(&c, *f, *holder, "acquire after lapse");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// acquire

/// Absent → `Acquired`, with a lease of about `now + lease`, and an InFlight record of the token.
pub async fn acquire_fresh_is_acquired<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let before = Timestamp::now();
    let lease = acquired(&s, req(id, fp(1), a), "acquire on absent").await;
    let after = Timestamp::now();
    assert_within(
        lease,
        before,
        after,
        LONG_LEASE,
        "Acquired.lease_expires_at",
    );
    let f = get_in_flight(&s, &id, "get after acquire").await;
    assert_eq!(f.token, a, "the record holds the acquiring token");
    assert_eq!(
        f.fingerprint,
        fp(1),
        "the record holds the request's fingerprint"
    );
}

/// The same token acquiring again (a retry after a timeout) → `Acquired` with the same lease.
pub async fn acquire_same_token_is_idempotent<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let first = acquired(&s, req(id, fp(1), a), "first acquire").await;
    let again = acquired(&s, req(id, fp(1), a), "same token again").await;
    assert_eq!(
        first, again,
        "a repeated acquire answers as the first (same lease)"
    );
}

/// Another token, same fingerprint, live lease → `InFlight` with the holder's lease end.
pub async fn acquire_other_token_sees_in_flight<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let lease = acquired(&s, req(id, fp(1), a), "holder acquires").await;
    let seen = in_flight(&s, req(id, fp(1), Token::random()), "duplicate acquires").await;
    assert_eq!(
        seen, lease,
        "InFlight reports the holder's lease_expires_at"
    );
    let f = get_in_flight(&s, &id, "get after duplicate").await;
    assert_eq!(f.token, a, "a duplicate never takes the record");
}

/// Another fingerprint on an in-flight record → `Mismatch`, record untouched.
pub async fn acquire_in_flight_other_fingerprint_is_mismatch<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let lease = acquired(&s, req(id, fp(1), a), "holder acquires").await;
    mismatch(&s, req(id, fp(2), Token::random()), "other fingerprint").await;
    let f = get_in_flight(&s, &id, "get after mismatch").await;
    assert_eq!(
        (f.token, f.fingerprint),
        (a, fp(1)),
        "a mismatch leaves the record untouched"
    );
    assert_eq!(
        f.lease_expires_at, lease,
        "a mismatch leaves the lease untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// complete and replay

/// `complete` → `Stored`; later acquires (any token, same fingerprint) replay the exact outcome.
pub async fn complete_then_acquire_replays_exact_outcome<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let before = Timestamp::now();
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    let after = Timestamp::now();
    for n in 0..2 {
        let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
        assert_eq!(
            c.outcome,
            sample_outcome(),
            "replay {n}: the exact outcome (status, ordered headers, body)"
        );
        assert_eq!(c.fingerprint, fp(1), "replay {n}: fingerprint kept");
        assert_eq!(
            c.origin_token, a,
            "replay {n}: origin_token is the completing token"
        );
        assert_within(c.expires_at, before, after, TTL, "Completed.expires_at");
    }
}

/// Every kind of outcome survives the store unchanged.
pub async fn every_outcome_kind_round_trips<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let head = ResponseHead {
        status: 303,
        headers: vec![
            ("location".into(), Bytes::from_static(b"/x")),
            ("etag".into(), Bytes::from_static(b"\"v1\"")),
        ],
    };
    let outcomes = [
        Outcome::Response {
            head: ResponseHead {
                status: 204,
                headers: vec![],
            },
            body: Bytes::new(),
        },
        Outcome::BodyNotStored { head: head.clone() },
        Outcome::BodyIncomplete { head },
        Outcome::Problem {
            kind: StoredProblemKind::HandlerFailed,
            status: 500,
        },
        Outcome::Problem {
            kind: StoredProblemKind::OutcomeUnknown,
            status: 504,
        },
    ];
    for outcome in outcomes {
        let (id, a) = (new_id(), Token::random());
        acquired(&s, req(id, fp(3), a), "acquire").await;
        stored(&s, &id, a, &outcome, "complete").await;
        let c = replayed(&s, req(id, fp(3), Token::random()), "replay").await;
        assert_eq!(c.outcome, outcome, "the outcome round-trips exactly");
        assert_eq!(
            get_completed(&s, &id, "get").await.outcome,
            outcome,
            "get returns it exactly"
        );
    }
}

/// A completed record met with another fingerprint → `Mismatch`, record untouched.
pub async fn completed_other_fingerprint_is_mismatch<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    mismatch(
        &s,
        req(id, fp(2), Token::random()),
        "replay with other fingerprint",
    )
    .await;
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay after mismatch").await;
    assert_eq!(
        c.outcome,
        sample_outcome(),
        "a mismatch leaves the outcome untouched"
    );
}

/// `complete` on an absent record (released, deleted or expired meanwhile) → `Stored`. It
/// carries no fingerprint, so it cannot write a record a retry could match: nothing is written,
/// and the key is free for the next attempt.
pub async fn complete_on_absent_is_stored<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let id = new_id();
    stored(
        &s,
        &id,
        Token::random(),
        &sample_outcome(),
        "complete on absent",
    )
    .await;
    get_absent(&s, &id, "get after complete on absent").await;
    acquired(
        &s,
        req(id, fp(1), Token::random()),
        "acquire after complete on absent",
    )
    .await;
}

/// Fencing: another token's `complete` is refused on an in-flight record and on a completed one,
/// and changes nothing.
pub async fn complete_by_other_token_is_fenced<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a, b) = (new_id(), Token::random(), Token::random());
    let lease = acquired(&s, req(id, fp(1), a), "acquire").await;
    let other = Outcome::Problem {
        kind: StoredProblemKind::HandlerFailed,
        status: 500,
    };
    let c = ok(
        s.complete(&id, b, &other, TTL).await,
        "complete by other token",
    );
    assert_eq!(
        c,
        Completion::Refused,
        "complete on another token's InFlight is fenced"
    );
    let f = get_in_flight(&s, &id, "get after fenced complete").await;
    assert_eq!(
        (f.token, f.lease_expires_at),
        (a, lease),
        "a fenced complete changes nothing"
    );
    stored(&s, &id, a, &sample_outcome(), "holder completes").await;
    let c = ok(
        s.complete(&id, b, &other, TTL).await,
        "complete by other token on Completed",
    );
    assert_eq!(
        c,
        Completion::Refused,
        "complete on another token's Completed is fenced"
    );
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
    assert_eq!(
        (c.outcome, c.origin_token),
        (sample_outcome(), a),
        "the holder's outcome stays"
    );
}

// ---------------------------------------------------------------------------------------------
// idempotence of every operation for its token

/// `acquire` repeated by the holder, before and after duplicates looked, answers the same.
pub async fn acquire_repeated_is_idempotent<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let lease = acquired(&s, req(id, fp(1), a), "acquire").await;
    for n in 0..3 {
        let again = acquired(&s, req(id, fp(1), a), "holder repeats acquire").await;
        assert_eq!(again, lease, "repeat {n}: same answer, same lease");
        let seen = in_flight(&s, req(id, fp(1), Token::random()), "duplicate").await;
        assert_eq!(
            seen, lease,
            "repeat {n}: duplicates still see the holder's lease"
        );
    }
    assert_eq!(
        get_in_flight(&s, &id, "get").await.token,
        a,
        "still the holder's record"
    );
}

/// `renew` repeated → `Renewed` each time; the lease never moves backwards.
pub async fn renew_repeated_is_idempotent<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let mut last = Timestamp(0);
    for n in 0..3 {
        match ok(s.renew(&id, a, LONG_LEASE * 2).await, "renew") {
            Renewal::Renewed { lease_expires_at } => {
                assert!(
                    lease_expires_at >= last,
                    "repeat {n}: lease never moves backwards"
                );
                last = lease_expires_at;
            }
            Renewal::Refused => panic!("repeat {n}: the holder's renew was refused"),
        }
    }
    let seen = in_flight(&s, req(id, fp(1), Token::random()), "duplicate").await;
    assert_eq!(seen, last, "duplicates see the latest renewed lease");
}

/// `complete` repeated by the same token → `Stored` each time, one outcome kept.
pub async fn complete_repeated_is_idempotent<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    for n in 0..3 {
        let c = ok(s.complete(&id, a, &sample_outcome(), TTL).await, "complete");
        assert_eq!(
            c,
            Completion::Stored,
            "repeat {n}: a repeated complete is Stored"
        );
        let r = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
        assert_eq!(
            (r.outcome, r.origin_token),
            (sample_outcome(), a),
            "repeat {n}: same outcome"
        );
    }
}

/// `release` repeated → `Released` each time; the key is free.
pub async fn release_repeated_is_idempotent<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    for n in 0..3 {
        let r = ok(s.release(&id, a).await, "release");
        assert_eq!(
            r,
            Release::Released,
            "repeat {n}: a repeated release is Released"
        );
    }
    get_absent(&s, &id, "get after release").await;
    acquired(&s, req(id, fp(1), Token::random()), "next attempt").await;
}

// ---------------------------------------------------------------------------------------------
// renew and release

/// The holder's `renew` → `Renewed` with a later lease end, which duplicates then see.
pub async fn renew_by_holder_extends_lease<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let first = acquired(&s, req(id, fp(1), a), "acquire").await;
    let before = Timestamp::now();
    let renewed = match ok(s.renew(&id, a, LONG_LEASE * 2).await, "renew") {
        Renewal::Renewed { lease_expires_at } => lease_expires_at,
        Renewal::Refused => panic!("the holder's renew was refused"),
    };
    let after = Timestamp::now();
    assert!(
        renewed > first,
        "renew extends the lease ({renewed:?} > {first:?})"
    );
    assert_within(
        renewed,
        before,
        after,
        LONG_LEASE * 2,
        "Renewed.lease_expires_at",
    );
    let f = get_in_flight(&s, &id, "get after renew").await;
    assert_eq!(
        (f.token, f.lease_expires_at),
        (a, renewed),
        "the record carries the new lease"
    );
    let seen = in_flight(&s, req(id, fp(1), Token::random()), "duplicate").await;
    assert_eq!(seen, renewed, "duplicates see the renewed lease");
}

/// `renew` by another token, on an absent record, and on a completed one → `Refused`.
pub async fn renew_by_other_token_or_absent_is_refused<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let r = ok(s.renew(&id, a, LONG_LEASE).await, "renew on absent");
    assert_eq!(r, Renewal::Refused, "renew on absent is refused");
    get_absent(&s, &id, "renew on absent creates nothing").await;
    let lease = acquired(&s, req(id, fp(1), a), "acquire").await;
    let r = ok(
        s.renew(&id, Token::random(), LONG_LEASE * 2).await,
        "renew by other token",
    );
    assert_eq!(r, Renewal::Refused, "renew by another token is refused");
    let f = get_in_flight(&s, &id, "get").await;
    assert_eq!(
        (f.token, f.lease_expires_at),
        (a, lease),
        "a refused renew changes nothing"
    );
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    let r = ok(s.renew(&id, a, LONG_LEASE).await, "renew after complete");
    assert_eq!(
        r,
        Renewal::Refused,
        "renew on a completed record is refused"
    );
    let c = get_completed(&s, &id, "get after refused renew").await;
    assert_eq!(
        c.outcome,
        sample_outcome(),
        "a refused renew leaves the outcome"
    );
}

/// The holder's `release` → `Released`; the record is gone and any request may acquire.
pub async fn release_by_holder_frees_the_key<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let r = ok(s.release(&id, a).await, "release");
    assert_eq!(r, Release::Released, "the holder's release is Released");
    get_absent(&s, &id, "get after release").await;
    // Another fingerprint: proves the old record is really gone, not merely unlocked.
    acquired(&s, req(id, fp(2), Token::random()), "acquire after release").await;
}

/// `release` on an absent record → `Released`, and it creates nothing.
pub async fn release_absent_is_released<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let id = new_id();
    let r = ok(s.release(&id, Token::random()).await, "release on absent");
    assert_eq!(r, Release::Released, "release on absent is Released");
    get_absent(&s, &id, "get after release on absent").await;
}

/// `release` by another token → `Refused` and the record (in flight or completed) is untouched.
pub async fn release_by_other_token_is_refused<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let lease = acquired(&s, req(id, fp(1), a), "acquire").await;
    let r = ok(
        s.release(&id, Token::random()).await,
        "release by other token",
    );
    assert_eq!(
        r,
        Release::Refused,
        "release of another token's InFlight is refused"
    );
    let f = get_in_flight(&s, &id, "get").await;
    assert_eq!(
        (f.token, f.lease_expires_at),
        (a, lease),
        "a refused release changes nothing"
    );
    in_flight(
        &s,
        req(id, fp(1), Token::random()),
        "duplicate after refused release",
    )
    .await;
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    let r = ok(
        s.release(&id, Token::random()).await,
        "release of a completed record",
    );
    assert_eq!(
        r,
        Release::Refused,
        "release of another token's Completed is refused"
    );
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
    assert_eq!(
        c.outcome,
        sample_outcome(),
        "a refused release leaves the outcome"
    );
}

// ---------------------------------------------------------------------------------------------
// lapsed leases

/// A lapsed lease met by another token (same fingerprint) → the outcome-unknown placeholder,
/// whose `origin_token` is the lapsed holder's, kept for the request's retention.
pub async fn lapsed_lease_becomes_outcome_unknown<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = h.lapse_leases(s, h.lease()).await;
    let before = Timestamp::now();
    let c = replayed(&s, req(id, fp(1), Token::random()), "acquire after lapse").await;
    let after = Timestamp::now();
    assert_placeholder(&c, fp(1), a, "acquire after lapse");
    assert_within(
        c.expires_at,
        before,
        after,
        TTL,
        "placeholder expires_at (the retention)",
    );
    let again = replayed(&s, req(id, fp(1), Token::random()), "acquire again").await;
    assert_eq!(again, c, "the placeholder is stored, not recomputed");
    assert_eq!(
        get_completed(&s, &id, "get").await,
        c,
        "get reads the placeholder"
    );
}

/// A lapsed lease met with another fingerprint → `Mismatch`, and the lapsed record still becomes
/// the placeholder (the conversion does not depend on who noticed it).
pub async fn lapsed_lease_other_fingerprint_is_mismatch<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = h.lapse_leases(s, h.lease()).await;
    mismatch(
        &s,
        req(id, fp(2), Token::random()),
        "other fingerprint after lapse",
    )
    .await;
    let c = get_completed(&s, &id, "get after mismatch").await;
    assert_placeholder(&c, fp(1), a, "record after mismatch on a lapsed lease");
    let c = replayed(&s, req(id, fp(1), Token::random()), "same fingerprint").await;
    assert_placeholder(&c, fp(1), a, "replay after mismatch");
}

/// The lapsed holder's late `complete` replaces the placeholder; retries replay the real outcome.
pub async fn late_complete_upgrades_placeholder<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = lapse_into_placeholders(h, s, &[(id, fp(1), a)]).await;
    for n in 0..2 {
        let c = ok(
            s.complete(&id, a, &sample_outcome(), TTL).await,
            "late complete",
        );
        assert_eq!(
            c,
            Completion::Stored,
            "attempt {n}: the lapsed holder's complete is Stored"
        );
    }
    let c = replayed(
        &s,
        req(id, fp(1), Token::random()),
        "replay after late complete",
    )
    .await;
    assert_eq!(
        c.outcome,
        sample_outcome(),
        "the real outcome replaced the placeholder"
    );
    assert_eq!(
        (c.fingerprint, c.origin_token),
        (fp(1), a),
        "fingerprint and origin kept"
    );
}

/// Another token's `complete` on a placeholder → `Refused`, placeholder untouched.
pub async fn complete_by_other_token_on_placeholder_is_refused<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = lapse_into_placeholders(h, s, &[(id, fp(1), a)]).await;
    let before = get_completed(&s, &id, "get placeholder").await;
    let c = ok(
        s.complete(&id, Token::random(), &sample_outcome(), TTL)
            .await,
        "complete by other",
    );
    assert_eq!(
        c,
        Completion::Refused,
        "only the lapsed holder may replace the placeholder"
    );
    assert_eq!(
        get_completed(&s, &id, "get after refused").await,
        before,
        "placeholder untouched"
    );
}

/// The lapsed holder's `renew` after its lease was turned into a placeholder → `Refused`.
pub async fn renew_after_lapse_is_refused<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = lapse_into_placeholders(h, s, &[(id, fp(1), a)]).await;
    let before = get_completed(&s, &id, "get placeholder").await;
    let r = ok(s.renew(&id, a, LONG_LEASE).await, "renew after lapse");
    assert_eq!(
        r,
        Renewal::Refused,
        "a lapsed lease cannot be renewed once converted"
    );
    assert_eq!(
        get_completed(&s, &id, "get after renew").await,
        before,
        "placeholder untouched"
    );
}

/// The lapsed holder's `release` must not delete the placeholder (a duplicate may already have
/// been told the outcome is unknown) → `Refused`.
pub async fn release_after_lapse_keeps_placeholder<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = lapse_into_placeholders(h, s, &[(id, fp(1), a)]).await;
    let before = get_completed(&s, &id, "get placeholder").await;
    let r = ok(s.release(&id, a).await, "release after lapse");
    assert_eq!(r, Release::Refused, "releasing a placeholder is refused");
    assert_eq!(
        get_completed(&s, &id, "get after release").await,
        before,
        "placeholder kept"
    );
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
    assert_placeholder(&c, fp(1), a, "replay after refused release");
}

/// `ReExecute`: a lapsed lease is treated as absent; the new token holds the record and the old
/// holder is fenced out of every operation.
pub async fn re_execute_hands_lapsed_lease_to_new_token<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a, b) = (new_id(), Token::random(), Token::random());
    acquired(&s, req_lease(id, fp(1), a, h.lease()), "acquire").await;
    let s = h.lapse_leases(s, h.lease()).await;
    let r = AcquireRequest {
        on_lease_expiry: LeaseExpiry::ReExecute,
        ..req(id, fp(1), b)
    };
    acquired(&s, r, "re-execute acquire").await;
    let f = get_in_flight(&s, &id, "get").await;
    assert_eq!(f.token, b, "the new token holds the record");
    let other = Outcome::Problem {
        kind: StoredProblemKind::HandlerFailed,
        status: 500,
    };
    let c = ok(
        s.complete(&id, a, &other, TTL).await,
        "old holder completes",
    );
    assert_eq!(
        c,
        Completion::Refused,
        "the old holder's complete is fenced"
    );
    let r = ok(s.renew(&id, a, LONG_LEASE).await, "old holder renews");
    assert_eq!(r, Renewal::Refused, "the old holder's renew is refused");
    let r = ok(s.release(&id, a).await, "old holder releases");
    assert_eq!(r, Release::Refused, "the old holder's release is refused");
    assert_eq!(
        get_in_flight(&s, &id, "get").await.token,
        b,
        "still the new token's"
    );
    stored(&s, &id, b, &sample_outcome(), "new holder completes").await;
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
    assert_eq!(
        (c.outcome, c.origin_token),
        (sample_outcome(), b),
        "the new holder's outcome"
    );
}

// ---------------------------------------------------------------------------------------------
// retention

/// A completed record past its TTL is absent for `acquire` (even with another fingerprint).
pub async fn completion_ttl_expiry_frees_the_key<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let c = ok(
        s.complete(&id, a, &sample_outcome(), SHORT_TTL).await,
        "complete",
    );
    assert_eq!(c, Completion::Stored);
    replayed(&s, req(id, fp(1), Token::random()), "replay within ttl").await;
    tokio::time::sleep(EXPIRY_WAIT).await;
    let b = Token::random();
    acquired(&s, req(id, fp(2), b), "acquire after ttl").await;
    assert_eq!(
        get_in_flight(&s, &id, "get").await.token,
        b,
        "the new attempt holds the key"
    );
}

/// `purge_expired` removes completed records past retention and nothing else.
pub async fn purge_expired_removes_only_expired<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (old, kept, live) = (new_id(), new_id(), new_id());
    let (a, b, c) = (Token::random(), Token::random(), Token::random());
    acquired(&s, req(old, fp(1), a), "acquire").await;
    let r = ok(
        s.complete(&old, a, &sample_outcome(), SHORT_TTL).await,
        "complete short",
    );
    assert_eq!(r, Completion::Stored);
    acquired(&s, req(kept, fp(1), b), "acquire").await;
    stored(&s, &kept, b, &sample_outcome(), "complete long").await;
    acquired(&s, req(live, fp(1), c), "acquire").await;
    tokio::time::sleep(EXPIRY_WAIT).await;
    ok(s.purge_expired().await, "purge_expired");
    get_absent(&s, &old, "an expired record is gone after purge").await;
    let k = get_completed(&s, &kept, "a live completed record survives purge").await;
    assert_eq!(k.outcome, sample_outcome(), "its outcome is intact");
    let f = get_in_flight(&s, &live, "an in-flight record survives purge").await;
    assert_eq!(f.token, c);
    ok(s.purge_expired().await, "purge_expired again");
}

// ---------------------------------------------------------------------------------------------
// operator operations

/// `get` reads absent, in-flight and completed records faithfully.
pub async fn get_reads_records<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    get_absent(&s, &id, "get on absent").await;
    let lease = acquired(&s, req(id, fp(5), a), "acquire").await;
    let f = get_in_flight(&s, &id, "get in flight").await;
    assert_eq!(
        (f.fingerprint, f.token, f.lease_expires_at),
        (fp(5), a, lease),
        "get returns the InFlight record as acquired"
    );
    let before = Timestamp::now();
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    let after = Timestamp::now();
    let c = get_completed(&s, &id, "get completed").await;
    assert_eq!(
        (c.fingerprint, c.origin_token, &c.outcome),
        (fp(5), a, &sample_outcome()),
        "get returns the Completed record as written"
    );
    assert_within(c.expires_at, before, after, TTL, "Completed.expires_at");
}

/// `delete`: absent → `NotFound`; in flight → `InFlightNeedsForce` unless forced; completed →
/// `Deleted`. A deleted record frees the key.
pub async fn delete_needs_force_for_in_flight<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let d = ok(s.delete(&id, false).await, "delete absent");
    assert_eq!(d, Deletion::NotFound, "deleting an absent record");
    let d = ok(s.delete(&id, true).await, "force-delete absent");
    assert_eq!(d, Deletion::NotFound, "force-deleting an absent record");
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let d = ok(s.delete(&id, false).await, "delete in flight");
    assert_eq!(
        d,
        Deletion::InFlightNeedsForce,
        "an in-flight record needs force"
    );
    assert_eq!(
        get_in_flight(&s, &id, "get").await.token,
        a,
        "nothing was deleted"
    );
    let d = ok(s.delete(&id, true).await, "force-delete in flight");
    assert_eq!(d, Deletion::Deleted, "force deletes an in-flight record");
    get_absent(&s, &id, "get after force delete").await;
    let b = Token::random();
    acquired(&s, req(id, fp(2), b), "acquire after delete").await;
    stored(&s, &id, b, &sample_outcome(), "complete").await;
    let d = ok(s.delete(&id, false).await, "delete completed");
    assert_eq!(
        d,
        Deletion::Deleted,
        "a completed record is deleted without force"
    );
    get_absent(&s, &id, "get after delete").await;
    acquired(&s, req(id, fp(3), Token::random()), "acquire after delete").await;
}

/// `resolve` on a placeholder: `Release` deletes it (the next retry executes); `Respond` replaces
/// it with the operator's outcome, which is final: the lapsed holder's late `complete` is fenced
/// (it no longer meets a placeholder of its own, SPEC §4), so retries that already got the
/// operator's answer never see another.
pub async fn resolve_release_and_respond<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (x, y, a, b) = (new_id(), new_id(), Token::random(), Token::random());
    acquired(&s, req_lease(x, fp(1), a, h.lease()), "acquire x").await;
    acquired(&s, req_lease(y, fp(2), b, h.lease()), "acquire y").await;
    let s = lapse_into_placeholders(h, s, &[(x, fp(1), a), (y, fp(2), b)]).await;

    let r = ok(s.resolve(&x, Resolution::Release).await, "resolve release");
    assert_eq!(r, Resolved::Resolved, "releasing a placeholder");
    get_absent(&s, &x, "get after resolve release").await;
    acquired(
        &s,
        req(x, fp(1), Token::random()),
        "retry after resolve release",
    )
    .await;

    let before = Timestamp::now();
    let respond = Resolution::Respond {
        outcome: sample_outcome(),
        ttl: TTL,
    };
    let r = ok(s.resolve(&y, respond).await, "resolve respond");
    let after = Timestamp::now();
    assert_eq!(r, Resolved::Resolved, "answering a placeholder");
    let c = replayed(
        &s,
        req(y, fp(2), Token::random()),
        "retry after resolve respond",
    )
    .await;
    assert_eq!(
        c.outcome,
        sample_outcome(),
        "retries get the operator's outcome"
    );
    assert_eq!(c.fingerprint, fp(2), "the fingerprint is kept");
    assert_within(c.expires_at, before, after, TTL, "resolved expires_at");
    mismatch(
        &s,
        req(y, fp(9), Token::random()),
        "other fingerprint after resolve",
    )
    .await;

    let late = Outcome::Response {
        head: ResponseHead {
            status: 201,
            headers: vec![("x-late".into(), Bytes::from_static(b"1"))],
        },
        body: Bytes::from_static(b"late"),
    };
    let r = ok(
        s.complete(&y, b, &late, TTL).await,
        "late complete after resolve",
    );
    assert_eq!(
        r,
        Completion::Refused,
        "the lapsed holder's late complete is fenced by the operator's answer"
    );
    let c = replayed(
        &s,
        req(y, fp(2), Token::random()),
        "retry after late complete",
    )
    .await;
    assert_eq!(
        c.outcome,
        sample_outcome(),
        "retries still get the operator's outcome"
    );
    let r = ok(
        s.complete(&x, a, &late, TTL).await,
        "late complete after release",
    );
    assert_eq!(
        r,
        Completion::Refused,
        "after a release the retry owns the key: the lapsed holder is fenced"
    );
}

/// `resolve` applies only to outcome-unknown placeholders: absent → `NotFound`; in flight or a
/// real outcome → `NotOutcomeUnknown`, untouched.
pub async fn resolve_only_on_outcome_unknown<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let r = ok(s.resolve(&id, Resolution::Release).await, "resolve absent");
    assert_eq!(r, Resolved::NotFound, "resolving an absent record");
    let lease = acquired(&s, req(id, fp(1), a), "acquire").await;
    for resolution in [
        Resolution::Release,
        Resolution::Respond {
            outcome: Outcome::outcome_unknown(),
            ttl: TTL,
        },
    ] {
        let r = ok(s.resolve(&id, resolution).await, "resolve in flight");
        assert_eq!(
            r,
            Resolved::NotOutcomeUnknown,
            "an in-flight record is not resolvable"
        );
    }
    let f = get_in_flight(&s, &id, "get").await;
    assert_eq!(
        (f.token, f.lease_expires_at),
        (a, lease),
        "in-flight record untouched"
    );
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    let respond = Resolution::Respond {
        outcome: Outcome::outcome_unknown(),
        ttl: TTL,
    };
    for resolution in [Resolution::Release, respond] {
        let r = ok(s.resolve(&id, resolution).await, "resolve completed");
        assert_eq!(
            r,
            Resolved::NotOutcomeUnknown,
            "a real outcome is not resolvable"
        );
    }
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
    assert_eq!(
        (c.outcome, c.origin_token),
        (sample_outcome(), a),
        "real outcome untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// concurrency, sizes, corruption, capacity

/// 64 tasks race to acquire one id with distinct tokens: exactly one `Acquired`, the rest see
/// its lease as `InFlight`.
pub async fn racing_acquires_have_one_winner<H: Harness>(h: &H) {
    const RACERS: usize = 64;
    let s = Arc::new(h.fresh().await);
    let id = new_id();
    let start = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = Vec::with_capacity(RACERS);
    for _ in 0..RACERS {
        let (s, start) = (Arc::clone(&s), Arc::clone(&start));
        tasks.push(tokio::spawn(async move {
            let token = Token::random();
            start.wait().await;
            (token, s.acquire(req(id, fp(1), token)).await)
        }));
    }
    let mut winners = Vec::new();
    let mut seen = Vec::new();
    for t in tasks {
        let (token, answer) = t.await.expect("racer task panicked");
        match ok(answer, "racing acquire") {
            Acquire::Acquired { lease_expires_at } => winners.push((token, lease_expires_at)),
            Acquire::InFlight { lease_expires_at } => seen.push(lease_expires_at),
            other => panic!("a racer got {other:?}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one racer acquires (got {})",
        winners.len()
    );
    let (winner, lease) = winners[0];
    assert!(
        seen.iter().all(|l| *l == lease),
        "the losers see the winner's lease"
    );
    assert_eq!(
        get_in_flight(&*s, &id, "get").await.token,
        winner,
        "the winner holds the record"
    );
}

/// A body with every byte value, and header values with every non-ASCII byte, round-trip.
pub async fn binary_body_round_trips<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let all: Vec<u8> = (0..=255u8).collect();
    let outcome = Outcome::Response {
        head: ResponseHead {
            status: 200,
            headers: vec![
                (
                    "x-high".into(),
                    Bytes::from((0x80..=0xffu8).collect::<Vec<u8>>()),
                ),
                ("x-nul".into(), Bytes::from_static(b"a\0b")),
                ("x-empty".into(), Bytes::new()),
            ],
        },
        body: Bytes::from(all.repeat(4)),
    };
    acquired(&s, req(id, fp(1), a), "acquire").await;
    stored(&s, &id, a, &outcome, "complete").await;
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay").await;
    assert_eq!(
        c.outcome, outcome,
        "binary body and header values round-trip"
    );
}

/// A 1 MiB body round-trips.
pub async fn one_mib_body_round_trips<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    let body: Vec<u8> = (0..1usize << 20)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect();
    let outcome = Outcome::Response {
        head: ResponseHead {
            status: 200,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/octet-stream"),
            )],
        },
        body: Bytes::from(body),
    };
    acquired(&s, req(id, fp(1), a), "acquire").await;
    stored(&s, &id, a, &outcome, "complete 1 MiB").await;
    let c = replayed(&s, req(id, fp(1), Token::random()), "replay 1 MiB").await;
    assert!(
        c.outcome == outcome,
        "the 1 MiB body round-trips byte for byte"
    );
}

fn assert_corrupt<T: Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Corrupt(_)) => {}
        other => {
            panic!("{what}: an unreadable record must give StoreError::Corrupt, got {other:?}")
        }
    }
}

/// Garbage in a record slot (fresh, or over a record) is never treated as absent: every operation
/// that reads it returns `Corrupt` and writes nothing; a forced delete clears it.
pub async fn corrupt_record_is_never_absent<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (blank, over, a) = (new_id(), new_id(), Token::random());
    acquired(&s, req(over, fp(1), a), "acquire").await;
    stored(&s, &over, a, &sample_outcome(), "complete").await;
    h.corrupt(&s, &blank).await;
    h.corrupt(&s, &over).await;
    for id in [blank, over] {
        let t = Token::random();
        assert_corrupt(s.acquire(req(id, fp(1), t)).await, "acquire");
        let re = AcquireRequest {
            on_lease_expiry: LeaseExpiry::ReExecute,
            ..req(id, fp(1), t)
        };
        assert_corrupt(s.acquire(re).await, "acquire (re-execute)");
        assert_corrupt(
            s.acquire(req(id, fp(2), Token::random())).await,
            "acquire (other fp)",
        );
        assert_corrupt(s.renew(&id, a, LONG_LEASE).await, "renew");
        assert_corrupt(s.complete(&id, a, &sample_outcome(), TTL).await, "complete");
        assert_corrupt(
            s.complete(&id, t, &sample_outcome(), TTL).await,
            "complete (other token)",
        );
        assert_corrupt(s.release(&id, a).await, "release");
        assert_corrupt(s.resolve(&id, Resolution::Release).await, "resolve");
        assert_corrupt(s.get(&id).await, "get");
        // Nothing above overwrote the slot: it still reads as corrupt.
        assert_corrupt(
            s.acquire(req(id, fp(1), t)).await,
            "acquire after all operations",
        );
        let d = ok(
            s.delete(&id, true).await,
            "force-delete an unreadable record",
        );
        assert_eq!(
            d,
            Deletion::Deleted,
            "an operator can clear an unreadable record"
        );
        get_absent(&s, &id, "get after deleting the unreadable record").await;
        acquired(
            &s,
            req(id, fp(1), Token::random()),
            "acquire after clearing",
        )
        .await;
    }
}

/// A tiny store fills up: `acquire` of a new record → `Full` (creating nothing), and every record
/// already there stays readable (never evicted early).
pub async fn tiny_store_is_full_and_keeps_records<H: Harness>(h: &H) {
    const MAX_RECORDS: usize = 20_000;
    let s = h.tiny().await;
    let outcome = Outcome::Response {
        head: ResponseHead {
            status: 200,
            headers: vec![("x-n".into(), Bytes::from_static(b"1"))],
        },
        body: Bytes::from(vec![0x5a; 1024]),
    };
    let mut completed = Vec::new();
    let mut in_flight_ids = Vec::new();
    let mut full_at = None;
    for _ in 0..MAX_RECORDS {
        let (id, t) = (new_id(), Token::random());
        match s.acquire(req(id, fp(1), t)).await {
            Ok(Acquire::Acquired { .. }) => {}
            Err(StoreError::Full(_)) => {
                full_at = Some(id);
                break;
            }
            other => panic!("acquire in a filling store: {other:?}"),
        }
        match s.complete(&id, t, &outcome, TTL).await {
            Ok(Completion::Stored) => completed.push(id),
            Err(StoreError::Full(_)) => in_flight_ids.push((id, t)),
            other => panic!("complete in a filling store: {other:?}"),
        }
    }
    let Some(rejected) = full_at else {
        panic!("a tiny store accepted {MAX_RECORDS} records of 1 KiB without StoreError::Full");
    };
    assert!(
        !completed.is_empty(),
        "a tiny store still holds at least one record"
    );
    get_absent(&s, &rejected, "a Full acquire creates nothing").await;
    // At the bound, a store whose measure of its own size moves without any record going
    // (Redis frees idle client buffers about every 100 ms) may take one more small record.
    // That is no eviction: what must hold is that every record stored before is still there.
    match s.acquire(req(new_id(), fp(1), Token::random())).await {
        Err(StoreError::Full(_)) | Ok(Acquire::Acquired { .. }) => {}
        other => panic!("a new acquire in a full store: {other:?}"),
    }
    for id in &completed {
        let c = get_completed(&s, id, "a stored record stays readable when full").await;
        assert_eq!(c.outcome, outcome, "its outcome is intact");
    }
    for (id, t) in &in_flight_ids {
        let f = get_in_flight(&s, id, "an in-flight record stays when full").await;
        assert_eq!(f.token, *t);
    }
}

// ---------------------------------------------------------------------------------------------
// wait mode

async fn assert_fires(w: &mut idemgate::store::Watch, what: &str) {
    if tokio::time::timeout(WATCH_DEADLINE, w.changed())
        .await
        .is_err()
    {
        panic!("{what}: the watch did not fire within {WATCH_DEADLINE:?}");
    }
}

/// A watch taken before `complete` fires when the outcome is stored.
pub async fn watch_fires_on_complete<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let w = ok(s.watch(&id, 10).await, "watch");
    let mut w = w.unwrap_or_else(|| panic!("watch refused below max_waiters"));
    stored(&s, &id, a, &sample_outcome(), "complete").await;
    assert_fires(&mut w, "watch before complete").await;
}

/// A watch taken before `release` fires when the record is released.
pub async fn watch_fires_on_release<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let (id, a) = (new_id(), Token::random());
    acquired(&s, req(id, fp(1), a), "acquire").await;
    let w = ok(s.watch(&id, 10).await, "watch");
    let mut w = w.unwrap_or_else(|| panic!("watch refused below max_waiters"));
    let r = ok(s.release(&id, a).await, "release");
    assert_eq!(r, Release::Released);
    assert_fires(&mut w, "watch before release").await;
}

/// `watch` admits at most `max_waiters` subscribers per key; a dropped one frees its place.
pub async fn watch_is_bounded_per_key<H: Harness>(h: &H) {
    let s = h.fresh().await;
    let id = new_id();
    let first = ok(s.watch(&id, 2).await, "watch 1");
    let second = ok(s.watch(&id, 2).await, "watch 2");
    assert!(
        first.is_some() && second.is_some(),
        "two waiters fit under max_waiters = 2"
    );
    let third = ok(s.watch(&id, 2).await, "watch 3");
    assert!(
        third.is_none(),
        "a third waiter is refused at max_waiters = 2"
    );
    drop(first);
    let again = ok(s.watch(&id, 2).await, "watch after drop");
    assert!(again.is_some(), "a dropped waiter frees its place");
    let other = ok(s.watch(&new_id(), 2).await, "watch other key");
    assert!(other.is_some(), "the bound is per key");
}
