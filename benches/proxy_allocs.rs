//! Heap allocations per proxied HTTP/1.1 GET on the fast path (session bound and ready),
//! counted by a counting global allocator.
//!
//! The client and the sandbox are plain blocking `std::net` loops on their own threads that
//! reuse one buffer and never allocate per request (the `direct` row proves it: it must
//! read 0), so every allocation counted during the `through_activator` run is the
//! activator's (its tokio runtime, hyper on both sides, the session table, headers,
//! metrics, access log). Run: `cargo bench --bench proxy_allocs`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use agent_activator::config::Config;
use agent_activator::server;

/// Counts every allocation and reallocation, then defers to the system allocator.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is exactly `System`'s; the counters are lock-free atomics and
// never allocate.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        REALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (see the impl).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\ncontent-type: application/json\r\n\r\n{\"ok\":true}";

/// A sandbox answering every GET on every connection with [`RESPONSE`], one thread per
/// connection, one reused buffer each.
fn sandbox() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                let mut filled = 0;
                loop {
                    // Answer every complete head in the buffer (no request bodies here).
                    while let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
                        if stream.write_all(RESPONSE).is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..filled, 0);
                        filled -= end + 4;
                    }
                    match stream.read(&mut buf[filled..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => filled += n,
                    }
                }
            });
        }
    });
    addr
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `Content-Length` of a response head (lower-cased compare, no allocation).
fn content_length(head: &[u8]) -> usize {
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"content-length") {
            let value = std::str::from_utf8(&line[colon + 1..]).unwrap().trim();
            return value.parse().unwrap();
        }
    }
    panic!(
        "response without content-length: {}",
        String::from_utf8_lossy(head)
    );
}

/// A keep-alive client that sends `request` and reads one whole response, `n` times;
/// returns the allocations counted over those `n` round trips.
fn run(stream: &mut TcpStream, request: &[u8], buf: &mut [u8], n: u64) -> (u64, u64, u64) {
    let before = (
        ALLOCS.load(Ordering::Relaxed),
        REALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    for _ in 0..n {
        stream.write_all(request).unwrap();
        let mut filled = 0;
        let need = loop {
            let read = stream.read(&mut buf[filled..]).unwrap();
            assert!(read > 0, "connection closed mid-response");
            filled += read;
            if let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
                assert!(buf.starts_with(b"HTTP/1.1 200"), "not a 200");
                break end + 4 + content_length(&buf[..end]);
            }
        };
        while filled < need {
            let read = stream.read(&mut buf[filled..]).unwrap();
            assert!(read > 0, "connection closed mid-body");
            filled += read;
        }
        assert_eq!(filled, need, "no pipelining here: exactly one response");
    }
    (
        ALLOCS.load(Ordering::Relaxed) - before.0,
        REALLOCS.load(Ordering::Relaxed) - before.1,
        BYTES.load(Ordering::Relaxed) - before.2,
    )
}

fn measure(name: &str, addr: SocketAddr, n: u64) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request: &str = "GET /v1/chat?q=1 HTTP/1.1\r\nhost: app.example\r\nuser-agent: bench\r\n\
         accept: */*\r\nx-session-id: bench-session\r\n\r\n";
    let mut buf = vec![0u8; 16 * 1024];
    // Warm up: binds the session, opens upstream connections, fills caches and pools.
    run(&mut stream, request.as_bytes(), &mut buf, 2_000);
    let (allocs, reallocs, bytes) = run(&mut stream, request.as_bytes(), &mut buf, n);
    let per = |x: u64| x as f64 / n as f64;
    println!(
        "{name:<20} {n:>7} requests: {:>6.2} allocs/request, {:>5.2} reallocs/request, \
         {:>7.1} bytes allocated/request",
        per(allocs),
        per(reallocs),
        per(bytes)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run a short
    // count there so the harness stays exercised without costing the test suite.
    let n = if std::env::args().any(|a| a == "--bench") {
        50_000
    } else {
        500
    };
    let up = sandbox();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // One current-thread runtime: the activator as a single worker, nothing else on it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut config = Config::from_yaml(&format!(
                "backend: {{kind: static, endpoints: ['{up}']}}\nlog: {{access_log: false}}\n\
                 autoscaler: {{enabled: false}}\n"
            ))
            .unwrap();
            config.listen = "127.0.0.1:0".parse().unwrap();
            config.admin_listen = "127.0.0.1:0".parse().unwrap();
            let server = server::start(config).await.unwrap();
            tx.send(server.proxy_addr()).unwrap();
            std::future::pending::<()>().await;
            drop(server);
        });
    });
    let proxied = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    println!("allocations per HTTP/1.1 GET (fast path, access log off):");
    measure("direct", up, n);
    measure("through_activator", proxied, n);
}
