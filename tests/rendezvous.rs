//! The rendezvous against clients that are not ranks (on loopback): junk, silence, a wrong
//! world size, a wrong secret, a secret on one side only, a fake rank 0 that does not know the
//! secret, and a fake rank 0 that announces an oversized answer. None of them may fail or hold
//! up the job, and no rank takes an id from a rank 0 that cannot prove it knows the secret.
use candle_parallel::launch::process::{rendezvous_with_secret, ProcessEnv, MAX_BLOB};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn env(rank: usize, world: usize, port: u16) -> ProcessEnv {
    ProcessEnv {
        rank,
        world_size: world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

/// Connects to rank 0, retrying until it listens.
fn connect(port: u16) -> TcpStream {
    let start = Instant::now();
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "rank 0 never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that greets rank 0 as rank `rank` of `world` (claiming a secret when `secret`)
/// and answers the challenge with `tag` (32 bytes of it).
fn claim(port: u16, rank: u64, world: u64, secret: bool, tag: u8) -> TcpStream {
    let mut s = connect(port);
    s.write_all(b"cp-rdzv3").unwrap();
    s.write_all(&rank.to_le_bytes()).unwrap();
    s.write_all(&world.to_le_bytes()).unwrap();
    s.write_all(&[u8::from(secret)]).unwrap();
    s.write_all(&[7u8; 32]).unwrap();
    // Rank 0's secret flag, challenge and proof.
    let mut answer = [0u8; 1 + 32 + 32];
    s.read_exact(&mut answer).unwrap();
    s.write_all(&[tag; 32]).unwrap();
    s
}

/// Runs a world of two with `secret`, after `intruders` have connected; the real rank 1 joins
/// last. Returns what each rank got and how long it took.
fn world_of_two(
    secret: Option<&'static str>,
    rank1_secret: Option<&'static str>,
    intruders: impl FnOnce(u16) -> Vec<TcpStream>,
) -> (
    candle_core::Result<Vec<u8>>,
    candle_core::Result<Vec<u8>>,
    Duration,
) {
    let port = free_port();
    let start = Instant::now();
    let r0 = std::thread::spawn(move || {
        rendezvous_with_secret(
            &env(0, 2, port),
            Some(b"the-id"),
            Duration::from_millis(2500),
            secret,
        )
    });
    let held = intruders(port); // kept open (silent ones stay silent) until the end
    std::thread::sleep(Duration::from_millis(100));
    let r1 = rendezvous_with_secret(
        &env(1, 2, port),
        None,
        Duration::from_millis(2500),
        rank1_secret,
    );
    let r0 = r0.join().unwrap();
    drop(held);
    (r0, r1, start.elapsed())
}

#[test]
fn strangers_are_dropped_without_failing_or_holding_up_the_job() {
    let (r0, r1, took) = world_of_two(None, None, |port| {
        let mut junk = connect(port);
        junk.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let silent = connect(port);
        // Our greeting but the wrong world size.
        let wrong = claim(port, 1, 7, false, 0);
        vec![junk, silent, wrong]
    });
    assert_eq!(r0.unwrap(), b"the-id");
    assert_eq!(r1.unwrap(), b"the-id");
    // The silent client would hold a serial accept loop for its whole 5 s handshake.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn only_processes_that_know_the_secret_get_the_id() {
    // A stranger without the secret claims rank 1 first: dropped; the real rank 1 gets in.
    let (r0, r1, _) = world_of_two(Some("s3cret"), Some("s3cret"), |port| {
        let mut thief = claim(port, 1, 2, true, 0x12);
        let mut rest = Vec::new();
        // Rank 0 closes the connection: nothing comes back.
        thief
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = thief.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the stranger got {rest:?}");
        vec![thief]
    });
    assert_eq!(r0.unwrap(), b"the-id");
    assert_eq!(r1.unwrap(), b"the-id");
    // A rank with the wrong secret is dropped too: the timeout names it and says why.
    let (r0, r1, _) = world_of_two(Some("s3cret"), Some("guess"), |_| Vec::new());
    let e = r0.unwrap_err().to_string();
    assert!(
        e.contains("rank(s) [1] did not show up") && e.contains("secret"),
        "{e}"
    );
    assert!(r1.is_err());
}

/// A secret on one side only is refused on both, naming the variable (a rank with a secret
/// used to take the id from a rank 0 without one).
#[test]
fn a_secret_on_one_side_only_is_refused() {
    for (rank0, rank1) in [(Some("s3cret"), None), (None, Some("s3cret"))] {
        let (r0, r1, _) = world_of_two(rank0, rank1, |_| Vec::new());
        let e1 = r1.unwrap_err().to_string();
        assert!(
            e1.contains("CANDLE_PARALLEL_RENDEZVOUS_SECRET") && e1.contains("rank 0 has"),
            "{e1}"
        );
        let e0 = r0.unwrap_err().to_string();
        assert!(
            e0.contains("did not show up") && e0.contains("CANDLE_PARALLEL_RENDEZVOUS_SECRET"),
            "{e0}"
        );
    }
}

/// A process that took the port first but does not know the secret cannot hand a rank an
/// id: the rank checks rank 0's proof before it takes anything.
#[test]
fn a_rank_takes_no_id_from_a_rank_0_without_the_secret() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 8 + 8 + 8 + 1 + 32];
        s.read_exact(&mut hello).unwrap();
        // Claims a secret, sends a challenge and a made-up proof, then a bogus id.
        s.write_all(&[1u8]).unwrap();
        s.write_all(&[3u8; 32]).unwrap();
        s.write_all(&[9u8; 32]).unwrap();
        let _ = s.write_all(&4u64.to_le_bytes());
        let _ = s.write_all(b"evil");
    });
    let e = rendezvous_with_secret(
        &env(1, 2, port),
        None,
        Duration::from_secs(4),
        Some("s3cret"),
    )
    .unwrap_err()
    .to_string();
    fake.join().unwrap();
    assert!(
        e.contains("does not know the job's secret") && e.contains("not this job's rank 0"),
        "{e}"
    );
}

#[test]
fn an_oversized_answer_is_refused_not_allocated() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A fake rank 0 that answers with an absurd length.
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 8 + 8 + 8 + 1 + 32];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&[0u8; 1 + 32 + 32]).unwrap();
        let mut answer = [0u8; 32];
        s.read_exact(&mut answer).unwrap();
        s.write_all(&u64::MAX.to_le_bytes()).unwrap();
    });
    let e = rendezvous_with_secret(&env(1, 2, port), None, Duration::from_secs(4), None)
        .unwrap_err()
        .to_string();
    fake.join().unwrap();
    assert!(
        e.contains(&u64::MAX.to_string()) && e.contains(&MAX_BLOB.to_string()),
        "{e}"
    );
}
