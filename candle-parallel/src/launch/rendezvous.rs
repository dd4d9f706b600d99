//! The TCP rendezvous of a multi-process job: rank 0 listens at `MASTER_ADDR:MASTER_PORT` and
//! hands every other rank a byte string (the NCCL unique id) once all have checked in.
//!
//! What it trusts: anyone who can reach the port can connect, as with torchrun's store. Each
//! connection is handled on its own bounded timeline (5 s to say who it is), and one that is
//! not a rank of this job — wrong bytes, silence, a wrong world size, a rank already taken, a
//! wrong secret — is dropped with a warning; it never fails the job (if a real rank was among
//! them, the timeout names the missing rank and lists the dropped connections). A rank reads
//! at most 64 KiB back. With `CANDLE_PARALLEL_RENDEZVOUS_SECRET` set (the same value for every
//! process of the job), each side proves to the other that it knows it: each sends a fresh
//! 32-byte challenge from the operating system's random source, and the other answers with an
//! HMAC-SHA-256 tag, keyed by the secret, of that challenge, the side it speaks for, the rank
//! and the world size (compared in constant time); the secret never crosses the network. So
//! rank 0 answers only ranks of the job, and a rank takes an id only from a rank 0 of the job
//! (not from a process that took the port first), and the id itself comes with a tag over it and
//! both challenges (a process relaying the handshake cannot substitute its own). A secret on one
//! side only is refused on both,
//! naming the variable. Without a secret, anyone who reaches the port first under a free rank
//! number gets the id: keep the port on a trusted network.

use super::process::ProcessEnv;
use candle_core::{bail, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"cp-rdzv3";
/// The environment variable that holds the job's shared secret.
pub const SECRET_VAR: &str = "CANDLE_PARALLEL_RENDEZVOUS_SECRET";
/// The most a rank accepts from rank 0 (an NCCL id is 128 bytes).
pub const MAX_BLOB: usize = 64 * 1024;
/// How long a connection has to say who it is.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// Bytes of a challenge and of a tag.
const CHALLENGE: usize = 32;

/// Who a tag speaks for: rank 0 answering a rank's challenge, or a rank answering rank 0's.
#[derive(Clone, Copy)]
enum Side {
    Server,
    Rank,
}

/// The keyed MAC of a challenge for the side that answers it, the rank it concerns and the
/// world size.
fn mac(
    secret: &str,
    side: Side,
    challenge: &[u8; CHALLENGE],
    rank: u64,
    world: u64,
) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    m.update(b"candle-parallel rendezvous v3");
    m.update(match side {
        Side::Server => b"rank 0",
        Side::Rank => b"rank n",
    });
    m.update(challenge);
    m.update(&rank.to_le_bytes());
    m.update(&world.to_le_bytes());
    m
}

/// The answer to `challenge` under `secret` (HMAC-SHA-256).
fn tag(secret: &str, side: Side, challenge: &[u8; CHALLENGE], rank: u64, world: u64) -> [u8; 32] {
    mac(secret, side, challenge, rank, world)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `answer` is the tag of `challenge` under `secret`, compared in constant time.
fn verify(
    secret: &str,
    side: Side,
    challenge: &[u8; CHALLENGE],
    rank: u64,
    world: u64,
    answer: &[u8; 32],
) -> bool {
    mac(secret, side, challenge, rank, world)
        .verify_slice(answer)
        .is_ok()
}

/// `CHALLENGE` unpredictable bytes from the operating system's random source.
fn challenge() -> std::io::Result<[u8; CHALLENGE]> {
    let mut out = [0u8; CHALLENGE];
    getrandom::fill(&mut out).map_err(|e| {
        std::io::Error::other(format!("the operating system's random source failed: {e}"))
    })?;
    Ok(out)
}

/// What a side says of its secret: whether it has one.
fn has_secret_byte(secret: Option<&str>) -> u8 {
    u8::from(secret.is_some())
}

/// Why two sides cannot talk when only one of them has a secret.
fn secret_mismatch(rank0_has: bool) -> String {
    if rank0_has {
        format!("rank 0 has a secret ({SECRET_VAR}) and this rank has none: set {SECRET_VAR} to the job's secret in every process")
    } else {
        format!("this rank has a secret ({SECRET_VAR}) and rank 0 has none: set {SECRET_VAR} to the same value in every process, or in none")
    }
}

fn secret() -> Option<String> {
    std::env::var(SECRET_VAR).ok().filter(|s| !s.is_empty())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A connection that said who it is: (rank, world size, stream, the challenges: its and
/// rank 0's).
type Hello = (usize, usize, TcpStream, [[u8; CHALLENGE]; 2]);

/// Rank 0's side of one connection, within `HANDSHAKE`: the rank's magic, rank, world size,
/// whether it has a secret and its challenge; then rank 0's answer (whether it has a secret,
/// its own challenge, its tag of the rank's challenge); then the rank's tag of rank 0's.
fn handshake(mut s: TcpStream, secret: Option<&str>) -> std::result::Result<Hello, String> {
    let fail = |what: &str, e: std::io::Error| format!("{what}: {e}");
    s.set_nonblocking(false).map_err(|e| fail("socket", e))?;
    s.set_read_timeout(Some(HANDSHAKE))
        .map_err(|e| fail("socket", e))?;
    s.set_write_timeout(Some(HANDSHAKE))
        .map_err(|e| fail("socket", e))?;
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)
        .map_err(|e| fail("no greeting", e))?;
    if &magic != MAGIC {
        return Err("not a candle-parallel rank of this version (wrong greeting)".into());
    }
    let rank = read_u64(&mut s).map_err(|e| fail("no rank", e))?;
    let world = read_u64(&mut s).map_err(|e| fail("no world size", e))?;
    let mut has = [0u8; 1];
    s.read_exact(&mut has)
        .map_err(|e| fail("no secret flag", e))?;
    let mut theirs = [0u8; CHALLENGE];
    s.read_exact(&mut theirs)
        .map_err(|e| fail("no challenge", e))?;
    let ours = challenge().map_err(|e| fail("challenge", e))?;
    let proof = secret.map_or([0u8; 32], |k| tag(k, Side::Server, &theirs, rank, world));
    s.write_all(&[has_secret_byte(secret)])
        .and_then(|_| s.write_all(&ours))
        .and_then(|_| s.write_all(&proof))
        .map_err(|e| fail("cannot answer", e))?;
    if (has[0] == 1) != secret.is_some() {
        return Err(format!(
            "rank {rank}: {}",
            if secret.is_some() {
                format!("has no secret but rank 0 has one ({SECRET_VAR})")
            } else {
                format!("has a secret but rank 0 has none ({SECRET_VAR})")
            }
        ));
    }
    let mut answer = [0u8; 32];
    s.read_exact(&mut answer)
        .map_err(|e| fail("no answer to the challenge", e))?;
    if let Some(secret) = secret {
        if !verify(secret, Side::Rank, &ours, rank, world, &answer) {
            return Err(format!(
                "claims rank {rank} but does not know the job's secret ({SECRET_VAR})"
            ));
        }
    }
    Ok((rank as usize, world as usize, s, [theirs, ours]))
}

/// Every rank gets rank 0's `blob` once all `world_size` ranks have checked in (a barrier).
/// Rank 0 passes `Some(blob)`, the others `None`. Fails, naming the ranks, when some do not
/// arrive within `timeout`; connections that are not ranks of this job are dropped (see the
/// [module docs](self)).
pub fn rendezvous(env: &ProcessEnv, blob: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>> {
    rendezvous_with_secret(env, blob, timeout, secret().as_deref())
}

/// [`rendezvous`] with the job's secret given (`None`: none) instead of read from
/// `CANDLE_PARALLEL_RENDEZVOUS_SECRET`.
pub fn rendezvous_with_secret(
    env: &ProcessEnv,
    blob: Option<&[u8]>,
    timeout: Duration,
    secret: Option<&str>,
) -> Result<Vec<u8>> {
    let io = |what: &str, e: std::io::Error| {
        candle_core::Error::msg(format!("rendezvous at {}: {what}: {e}", env.address()))
    };
    if env.rank == 0 {
        let Some(blob) = blob else {
            bail!("rendezvous: rank 0 must provide the blob")
        };
        if blob.len() > MAX_BLOB {
            bail!(
                "rendezvous: a blob of {} bytes is more than the {MAX_BLOB} a rank accepts",
                blob.len()
            )
        }
        serve(env, blob, timeout, secret).map_err(|e| match e {
            Served::Io(what, e) => io(what, e),
            Served::Other(e) => e,
        })?;
        Ok(blob.to_vec())
    } else {
        join(env, timeout, secret)
    }
}

enum Served {
    Io(&'static str, std::io::Error),
    Other(candle_core::Error),
}

/// Rank 0: accepts connections until every rank has checked in, then sends each the blob.
fn serve(
    env: &ProcessEnv,
    blob: &[u8],
    timeout: Duration,
    secret: Option<&str>,
) -> std::result::Result<(), Served> {
    let deadline = Instant::now() + timeout;
    let listener = TcpListener::bind(env.address()).map_err(|e| Served::Io("cannot listen", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Served::Io("listener", e))?;
    let (tx, rx) = mpsc::channel::<(SocketAddr, std::result::Result<Hello, String>)>();
    let mut peers: Vec<Option<(TcpStream, [[u8; CHALLENGE]; 2])>> =
        (0..env.world_size).map(|_| None).collect();
    let mut dropped: Vec<String> = Vec::new();
    let mut drop_one = |from: SocketAddr, why: String| {
        tracing::warn!(%from, "rendezvous: dropped a connection: {why}");
        dropped.push(format!("{from}: {why}"));
    };
    while peers.iter().skip(1).any(Option::is_none) {
        let accepted = match listener.accept() {
            Ok((s, from)) => {
                // Each connection on its own thread: a silent one cannot hold the others up.
                let (tx, secret) = (tx.clone(), secret.map(str::to_string));
                std::thread::spawn(move || {
                    let _ = tx.send((from, handshake(s, secret.as_deref())));
                });
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(Served::Io("accept", e)),
        };
        while let Ok((from, hello)) = rx.try_recv() {
            match hello {
                Err(why) => drop_one(from, why),
                Ok((r, w, ..)) if w != env.world_size => drop_one(
                    from,
                    format!(
                        "rank {r} has WORLD_SIZE={w} but rank 0 has {}",
                        env.world_size
                    ),
                ),
                Ok((r, w, ..)) if r == 0 || r >= w => {
                    drop_one(from, format!("rank {r} is not a rank 1..{w} can hold"))
                }
                Ok((r, ..)) if peers[r].is_some() => drop_one(
                    from,
                    format!("a second process claims rank {r}: check RANK of every process"),
                ),
                Ok((r, _, s, challenges)) => peers[r] = Some((s, challenges)),
            }
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (1..env.world_size)
                .filter(|r| peers[*r].is_none())
                .collect();
            let also = if dropped.is_empty() {
                String::new()
            } else {
                format!("; dropped connections: {}", dropped.join("; "))
            };
            return Err(Served::Other(candle_core::Error::msg(format!(
                "rendezvous at {}: rank(s) {missing:?} did not show up within {:.1}s{also}",
                env.address(),
                timeout.as_secs_f64()
            ))));
        }
        if !accepted {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let world = env.world_size as u64;
    for (r, peer) in peers.iter_mut().enumerate() {
        let Some((s, [theirs, ours])) = peer else {
            continue;
        };
        // With a secret, the blob comes with its tag under both challenges: a process relaying
        // the handshake cannot substitute its own.
        let seal = secret.map_or([0u8; 32], |k| {
            blob_tag(k, theirs, ours, r as u64, world, blob)
        });
        s.write_all(&(blob.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(blob))
            .and_then(|_| s.write_all(&seal))
            .map_err(|e| Served::Io("send", e))?;
    }
    Ok(())
}

/// A rank other than 0: checks in and waits for the blob.
fn join(env: &ProcessEnv, timeout: Duration, secret: Option<&str>) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let io = |what: &str, e: std::io::Error| {
        candle_core::Error::msg(format!("rendezvous at {}: {what}: {e}", env.address()))
    };
    // Rank 0 may not be listening yet: retry until the deadline.
    let mut s = loop {
        let addrs: Vec<_> = env
            .address()
            .to_socket_addrs()
            .map_err(|e| io("bad MASTER_ADDR", e))?
            .collect();
        if let Some(s) = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).ok())
        {
            break s;
        }
        if Instant::now() >= deadline {
            bail!(
                "rendezvous: rank {} could not reach rank 0 at {} within {:.1}s: is rank 0 running, and MASTER_ADDR/MASTER_PORT right?",
                env.rank,
                env.address(),
                timeout.as_secs_f64()
            )
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (rank, world) = (env.rank as u64, env.world_size as u64);
    let ours = challenge().map_err(|e| io("challenge", e))?;
    s.write_all(MAGIC)
        .and_then(|_| s.write_all(&rank.to_le_bytes()))
        .and_then(|_| s.write_all(&world.to_le_bytes()))
        .and_then(|_| s.write_all(&[has_secret_byte(secret)]))
        .and_then(|_| s.write_all(&ours))
        .map_err(|e| io("send", e))?;
    s.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))
    .map_err(|e| io("socket", e))?;
    let no_answer = |e: std::io::Error| {
        candle_core::Error::msg(format!(
            "rendezvous: rank {} got no answer from rank 0 at {} ({e}): another rank did not show up, rank 0 failed, or it dropped this rank (a wrong WORLD_SIZE or {SECRET_VAR}: see rank 0's log)",
            env.rank,
            env.address()
        ))
    };
    let mut has = [0u8; 1];
    s.read_exact(&mut has).map_err(no_answer)?;
    let mut theirs = [0u8; CHALLENGE];
    s.read_exact(&mut theirs).map_err(no_answer)?;
    let mut proof = [0u8; 32];
    s.read_exact(&mut proof).map_err(no_answer)?;
    if (has[0] == 1) != secret.is_some() {
        bail!(
            "rendezvous at {}: {}",
            env.address(),
            secret_mismatch(has[0] == 1)
        )
    }
    if let Some(secret) = secret {
        // Rank 0 proves it knows the secret before this rank takes anything from it.
        if !verify(secret, Side::Server, &ours, rank, world, &proof) {
            bail!(
                "rendezvous: the process at {} does not know the job's secret ({SECRET_VAR}): it is not this job's rank 0 (another job on the port, or a process that took it first)",
                env.address()
            )
        }
    }
    let answer = secret.map_or([0u8; 32], |k| tag(k, Side::Rank, &theirs, rank, world));
    s.write_all(&answer).map_err(|e| io("send", e))?;
    let len = read_u64(&mut s).map_err(no_answer)?;
    if len > MAX_BLOB as u64 {
        bail!(
            "rendezvous: rank 0 at {} announced {len} bytes, more than the {MAX_BLOB} a rank \
             accepts: not a candle-parallel rendezvous",
            env.address()
        )
    }
    let mut blob = vec![0u8; len as usize];
    s.read_exact(&mut blob).map_err(|e| io("receive", e))?;
    let mut seal = [0u8; 32];
    s.read_exact(&mut seal).map_err(|e| io("receive", e))?;
    if let Some(secret) = secret {
        let want = blob_mac(secret, &ours, &theirs, rank, world, &blob);
        if want.verify_slice(&seal).is_err() {
            bail!(
                "rendezvous: the id from {} does not carry the job's tag ({SECRET_VAR}): it was altered on the way or comes from a process that is not this job's rank 0",
                env.address()
            )
        }
    }
    Ok(blob)
}

/// The keyed MAC of the blob rank 0 hands rank `rank`, bound to both challenges of that
/// connection (the rank's, then rank 0's).
fn blob_mac(
    secret: &str,
    rank_challenge: &[u8; CHALLENGE],
    server_challenge: &[u8; CHALLENGE],
    rank: u64,
    world: u64,
    blob: &[u8],
) -> Hmac<Sha256> {
    let mut m = mac(secret, Side::Server, rank_challenge, rank, world);
    m.update(b"blob");
    m.update(server_challenge);
    m.update(&(blob.len() as u64).to_le_bytes());
    m.update(blob);
    m
}

/// [`blob_mac`]'s tag.
fn blob_tag(
    secret: &str,
    rank_challenge: &[u8; CHALLENGE],
    server_challenge: &[u8; CHALLENGE],
    rank: u64,
    world: u64,
    blob: &[u8],
) -> [u8; 32] {
    blob_mac(secret, rank_challenge, server_challenge, rank, world, blob)
        .finalize()
        .into_bytes()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        let got: [u8; 32] = m.finalize().into_bytes().into();
        let want = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, want);
    }

    #[test]
    fn tags_bind_the_side_rank_world_and_secret() {
        let c = challenge().unwrap();
        let t = tag("s", Side::Rank, &c, 1, 4);
        assert!(verify("s", Side::Rank, &c, 1, 4, &t));
        assert!(!verify("s", Side::Server, &c, 1, 4, &t));
        assert!(!verify("s", Side::Rank, &c, 2, 4, &t));
        assert!(!verify("s", Side::Rank, &c, 1, 3, &t));
        assert!(!verify("t", Side::Rank, &c, 1, 4, &t));
        assert_ne!(challenge().unwrap(), c);
        // The blob's seal binds the blob and both challenges.
        let d = challenge().unwrap();
        let seal = blob_tag("s", &c, &d, 1, 4, b"id");
        assert!(blob_mac("s", &c, &d, 1, 4, b"id")
            .verify_slice(&seal)
            .is_ok());
        assert!(blob_mac("s", &c, &d, 1, 4, b"ix")
            .verify_slice(&seal)
            .is_err());
        assert!(blob_mac("s", &d, &c, 1, 4, b"id")
            .verify_slice(&seal)
            .is_err());
    }
}
