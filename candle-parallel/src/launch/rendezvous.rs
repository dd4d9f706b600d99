//! The TCP rendezvous of a multi-process job: rank 0 listens at `MASTER_ADDR:MASTER_PORT` and
//! hands every other rank a byte string (the NCCL unique id) once all have checked in.
//!
//! What it trusts: anyone who can reach the port can connect, as with torchrun's store. Each
//! connection is handled on its own bounded timeline (5 s to say who it is), and one that is
//! not a rank of this job — wrong bytes, silence, a wrong world size, a rank already taken, a
//! wrong secret — is dropped with a warning; it never fails the job (if a real rank was among
//! them, the timeout names the missing rank and lists the dropped connections). A rank reads
//! at most 64 KiB back. With `CANDLE_PARALLEL_RENDEZVOUS_SECRET` set (the same value for every
//! process of the job), rank 0 answers only processes that prove they know it: rank 0 sends
//! a fresh random challenge and the rank answers with a SipHash-2-4 tag of it keyed by the
//! secret, so the secret never crosses the network. Without a secret, anyone who reaches the
//! port first under a free rank number gets the id: keep the port on a trusted network.

use super::process::ProcessEnv;
use candle_core::{bail, Result};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"cp-rdzv2";
/// The environment variable that holds the job's shared secret.
pub const SECRET_VAR: &str = "CANDLE_PARALLEL_RENDEZVOUS_SECRET";
/// The most a rank accepts from rank 0 (an NCCL id is 128 bytes).
pub const MAX_BLOB: usize = 64 * 1024;
/// How long a connection has to say who it is.
const HANDSHAKE: Duration = Duration::from_secs(5);

/// SipHash-2-4 of `msg` under the key `(k0, k1)`.
fn siphash24(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let mut words = msg.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let m = u64::from_le_bytes(b);
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    let mut last = (msg.len() as u64) << 56;
    for (i, &b) in words.remainder().iter().enumerate() {
        last |= (b as u64) << (8 * i);
    }
    v[3] ^= last;
    round(&mut v);
    round(&mut v);
    v[0] ^= last;
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// The answer to `challenge` for a rank that claims (`rank`, `world`), under `secret`.
fn tag(secret: &str, challenge: &[u8; 16], rank: u64, world: u64) -> u64 {
    let key = |domain: u64| siphash24(domain, 0x6370_2d72_647a_7631, secret.as_bytes());
    let mut msg = challenge.to_vec();
    msg.extend_from_slice(&rank.to_le_bytes());
    msg.extend_from_slice(&world.to_le_bytes());
    siphash24(key(1), key(2), &msg)
}

/// 16 unpredictable bytes (std's hasher keys come from the OS's random source).
fn challenge() -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

fn secret() -> Option<String> {
    std::env::var(SECRET_VAR).ok().filter(|s| !s.is_empty())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A connection that said who it is: (rank, world size, stream).
type Hello = (usize, usize, TcpStream);

/// Rank 0's side of one connection: magic, rank and world size, then the challenge and its
/// answer, all within `HANDSHAKE`.
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
        return Err("not a candle-parallel rank (wrong greeting)".into());
    }
    let rank = read_u64(&mut s).map_err(|e| fail("no rank", e))?;
    let world = read_u64(&mut s).map_err(|e| fail("no world size", e))?;
    let c = challenge();
    s.write_all(&c)
        .map_err(|e| fail("cannot send the challenge", e))?;
    let answer = read_u64(&mut s).map_err(|e| fail("no answer to the challenge", e))?;
    if let Some(secret) = secret {
        if answer != tag(secret, &c, rank, world) {
            return Err(format!(
                "claims rank {rank} but does not know the job's secret ({SECRET_VAR})"
            ));
        }
    }
    Ok((rank as usize, world as usize, s))
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
    let mut peers: Vec<Option<TcpStream>> = (0..env.world_size).map(|_| None).collect();
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
                Ok((r, w, _)) if w != env.world_size => drop_one(
                    from,
                    format!(
                        "rank {r} has WORLD_SIZE={w} but rank 0 has {}",
                        env.world_size
                    ),
                ),
                Ok((r, w, _)) if r == 0 || r >= w => {
                    drop_one(from, format!("rank {r} is not a rank 1..{w} can hold"))
                }
                Ok((r, _, _)) if peers[r].is_some() => drop_one(
                    from,
                    format!("a second process claims rank {r}: check RANK of every process"),
                ),
                Ok((r, _, s)) => peers[r] = Some(s),
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
    for s in peers.iter_mut().flatten() {
        s.write_all(&(blob.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(blob))
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
    s.write_all(MAGIC)
        .and_then(|_| s.write_all(&rank.to_le_bytes()))
        .and_then(|_| s.write_all(&world.to_le_bytes()))
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
    let mut c = [0u8; 16];
    s.read_exact(&mut c).map_err(no_answer)?;
    let answer = secret.map_or(0, |secret| tag(secret, &c, rank, world));
    s.write_all(&answer.to_le_bytes())
        .map_err(|e| io("send", e))?;
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
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_the_reference_vector() {
        // SipHash-2-4, key 00..0f, message 00..0e (the paper's example).
        let k0 = u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]);
        let k1 = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash24(k0, k1, &msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn challenges_differ() {
        assert_ne!(challenge(), challenge());
    }
}
