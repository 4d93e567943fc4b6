//! A client that leaves mid-response or mid-upload: the upstream connection it used must
//! never hand the rest of that exchange to another request, and a cut upload must never
//! reach the sandbox as a complete request.

use super::*;

/// A response whose body, once the client is gone, still carries bytes that look like a
/// whole HTTP response: a proxy that reused the connection without finishing (or
/// discarding) the body would hand them to the next request.
fn poisoned_response() -> Vec<Step> {
    let decoy = ok(b"WRONG");
    let first = vec![b'p'; 32 * 1024];
    let mut head = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
        first.len() + decoy.len()
    )
    .into_bytes();
    head.extend_from_slice(&first);
    vec![
        Step::Send(head),
        Step::Mark("first part sent"),
        Step::AwaitRelease,
        Step::Send(decoy),
    ]
}

/// Reads the head and the first part of the poisoned body, then drops the connection.
async fn leave_mid_response(server: &RunningServer, prelude: &[u8], session: &str) {
    let mut client = raw(server).await;
    client.write(prelude).await.unwrap();
    if !prelude.is_empty() {
        bounded("prelude answer", client.read_response("GET"))
            .await
            .unwrap();
    }
    let req = format!("GET /poisoned HTTP/1.1\r\nhost: a\r\nx-session-id: {session}\r\n\r\n");
    client.write(req.as_bytes()).await.unwrap();
    let head = bounded("head", client.read_response_head()).await.unwrap();
    assert_eq!(head.status, 200);
    drop(client);
}

async fn next_answer_is_clean(sandbox: &ScriptedSandbox, mut client: Client, session: &str) {
    let before = sandbox.log().count("/clean");
    sandbox.release();
    for i in 0..3 {
        let got = client.get("/clean", session).await;
        assert_eq!(
            (got.status, got.text().as_str()),
            (200, "clean"),
            "request {i}"
        );
    }
    assert_eq!(
        sandbox.log().count("/clean"),
        before + 3,
        "each delivered once"
    );
}

fn poisoned_or_clean(req: &Received, _: usize) -> Vec<Step> {
    match req.target() {
        "/poisoned" => poisoned_response(),
        _ => vec![Step::Send(ok(b"clean"))],
    }
}

#[tokio::test]
async fn client_leaving_mid_response_leaves_nothing_for_the_next_request() {
    let sandbox = ScriptedSandbox::start(poisoned_or_clean).await;
    let server = proxy(&[&sandbox], "").await;
    leave_mid_response(&server, b"", "lv").await;
    sandbox
        .wait_for("the first part", WAIT, |log| log.marked("first part sent"))
        .await;
    let client = Client::open(server.proxy_addr()).await;
    next_answer_is_clean(&sandbox, client, "lv").await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_leaving_mid_response_on_a_mixed_connection_leaves_nothing_in_the_pool() {
    // Two sessions on each client connection: the second one's requests take the shared
    // pool, where a connection left mid-response could be handed to another client.
    let victim = ScriptedSandbox::start(poisoned_or_clean).await;
    let other = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nother").await;
    let server = proxy(&[&victim, &other], "").await;
    // Bind the sessions: "first" goes to the least-loaded sandbox, then "victim" to the other.
    let mut setup = Client::open(server.proxy_addr()).await;
    let a = setup.get("/clean", "mx-victim").await;
    let b = setup.get("/clean", "mx-other").await;
    assert_eq!((a.status, b.status), (200, 200));
    let (victim_session, other_session) = if a.text() == "clean" {
        ("mx-victim", "mx-other")
    } else {
        ("mx-other", "mx-victim")
    };
    drop(setup);
    let prelude = format!("GET / HTTP/1.1\r\nhost: a\r\nx-session-id: {other_session}\r\n\r\n");
    leave_mid_response(&server, prelude.as_bytes(), victim_session).await;
    victim
        .wait_for("the first part", WAIT, |log| log.marked("first part sent"))
        .await;
    let mut client = Client::open(server.proxy_addr()).await;
    assert_eq!(client.get("/", other_session).await.text(), "other");
    next_answer_is_clean(&victim, client, victim_session).await;
    server.shutdown().await;
}

// === a client that leaves mid-upload ===

/// Sends the head and 100 bytes of a body for `/partial-{chunked}`, then drops the
/// connection.
async fn leave_mid_upload(server: &RunningServer, prelude: &[u8], session: &str, chunked: bool) {
    let mut client = raw(server).await;
    client.write(prelude).await.unwrap();
    if !prelude.is_empty() {
        bounded("prelude answer", client.read_response("GET"))
            .await
            .unwrap();
    }
    let framing = if chunked {
        "transfer-encoding: chunked\r\n\r\n64\r\n"
    } else {
        "content-length: 1000\r\n\r\n"
    };
    let head = format!(
        "POST /partial-{chunked} HTTP/1.1\r\nhost: a\r\nx-session-id: {session}\r\n{framing}"
    );
    client.write(head.as_bytes()).await.unwrap();
    client.write(&[b'u'; 100]).await.unwrap();
    drop(client);
}

/// Marks when a `/partial-*` body is complete; every request is answered with its target
/// once its body is in.
fn partial_upload_script(req: &Received, _: usize) -> Vec<Step> {
    let answer = Step::Send(ok(req.target().as_bytes()));
    if req.target().starts_with("/partial") {
        vec![Step::ReadBody, Step::Mark("partial body complete"), answer]
    } else {
        vec![Step::ReadBody, answer]
    }
}

/// The cut upload's connection must be closed, never completed: ending a chunked body
/// early would hand the sandbox a truncated upload as whole, and reusing the connection
/// would make the next request's bytes part of the body.
async fn upload_is_abandoned(sandbox: &ScriptedSandbox, chunked: bool) {
    let path = format!("/partial-{chunked}");
    sandbox
        .wait_for("the partial upload's head", WAIT, |log| {
            log.count(&path) == 1
        })
        .await;
    let log = sandbox.log();
    let conn = log
        .requests
        .iter()
        .find(|r| r.target() == path)
        .unwrap()
        .conn;
    sandbox
        .wait_for(
            "the proxy to close the cut upload's connection",
            WAIT,
            |log| log.closed_by_peer.contains(&conn),
        )
        .await;
    let marks = sandbox.log().marks;
    assert!(
        !marks.contains(&(conn, "partial body complete")),
        "{marks:?}"
    );
}

/// Three requests of `session` on a new client connection: each answered by its own
/// answer and delivered once.
async fn next_requests_are_clean(
    server: &RunningServer,
    sandbox: &ScriptedSandbox,
    session: &str,
    tag: &str,
) {
    let mut client = Client::open(server.proxy_addr()).await;
    for i in 0..3 {
        let path = format!("/after/{tag}/{i}");
        let got = client.get(&path, session).await;
        assert_eq!((got.status, got.text()), (200, path.clone()));
        assert_eq!(sandbox.log().count(&path), 1);
    }
}

#[tokio::test]
async fn client_leaving_mid_upload_never_completes_the_request() {
    let sandbox = ScriptedSandbox::start_on_head(partial_upload_script).await;
    let server = proxy(&[&sandbox], "").await;
    for chunked in [false, true] {
        leave_mid_upload(&server, b"", "lu", chunked).await;
        upload_is_abandoned(&sandbox, chunked).await;
        next_requests_are_clean(&server, &sandbox, "lu", &chunked.to_string()).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn client_leaving_mid_upload_on_a_mixed_connection_leaves_nothing_in_the_pool() {
    let victim = ScriptedSandbox::start_on_head(partial_upload_script).await;
    let other = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nother").await;
    let server = proxy(&[&victim, &other], "").await;
    let mut setup = Client::open(server.proxy_addr()).await;
    let a = setup.get("/bind", "mu-1").await;
    assert_eq!(setup.get("/bind", "mu-2").await.status, 200);
    let (victim_session, other_session) = if a.text() == "/bind" {
        ("mu-1", "mu-2")
    } else {
        ("mu-2", "mu-1")
    };
    drop(setup);
    let prelude = format!("GET / HTTP/1.1\r\nhost: a\r\nx-session-id: {other_session}\r\n\r\n");
    leave_mid_upload(&server, prelude.as_bytes(), victim_session, false).await;
    upload_is_abandoned(&victim, false).await;
    // Through the pool again: a mixed client connection.
    let mut client = Client::open(server.proxy_addr()).await;
    assert_eq!(client.get("/", other_session).await.text(), "other");
    for i in 0..3 {
        let path = format!("/after/{i}");
        let got = client.get(&path, victim_session).await;
        assert_eq!((got.status, got.text()), (200, path.clone()));
        assert_eq!(victim.log().count(&path), 1);
    }
    server.shutdown().await;
}

// === a client that leaves before the response head ===

/// Answers `/thinking` only after a release (then marks "late sent"); everything else at
/// once with its target.
fn thinking_or_fresh(req: &Received, _: usize) -> Vec<Step> {
    match req.target() {
        "/thinking" => vec![
            Step::AwaitRelease,
            Step::Send(ok(b"late")),
            Step::Mark("late sent"),
        ],
        t => vec![Step::Send(ok(t.as_bytes()))],
    }
}

/// Sends `/thinking` (after `prelude`), waits until the sandbox has it, and leaves.
async fn leave_before_the_head(
    server: &RunningServer,
    sandbox: &ScriptedSandbox,
    prelude: &[u8],
    session: &str,
) {
    let mut client = raw(server).await;
    client.write(prelude).await.unwrap();
    if !prelude.is_empty() {
        bounded("prelude answer", client.read_response("GET"))
            .await
            .unwrap();
    }
    let req = format!("GET /thinking HTTP/1.1\r\nhost: a\r\nx-session-id: {session}\r\n\r\n");
    client.write(req.as_bytes()).await.unwrap();
    sandbox
        .wait_for("the request at the sandbox", WAIT, |log| {
            log.count("/thinking") == 1
        })
        .await;
    drop(client);
}

/// The sandbox answers the abandoned request now; later requests get their own answers.
async fn late_answer_reaches_nobody(sandbox: &ScriptedSandbox, client: &mut Client, session: &str) {
    sandbox.release();
    sandbox
        .wait_for("the late answer to be written or refused", WAIT, |log| {
            log.marked("late sent") || !log.closed_by_peer.is_empty()
        })
        .await;
    for i in 0..3 {
        let path = format!("/fresh/{i}");
        let got = client.get(&path, session).await;
        assert_eq!(
            (got.status, got.text()),
            (200, path.clone()),
            "never the late answer"
        );
        assert_eq!(sandbox.log().count(&path), 1);
    }
}

#[tokio::test]
async fn client_leaving_before_the_head_leaves_no_answer_for_the_next_request() {
    let sandbox = ScriptedSandbox::start(thinking_or_fresh).await;
    let server = proxy(&[&sandbox], "").await;
    leave_before_the_head(&server, &sandbox, b"", "lh").await;
    let mut client = Client::open(server.proxy_addr()).await;
    late_answer_reaches_nobody(&sandbox, &mut client, "lh").await;
    server.shutdown().await;
}

#[tokio::test]
async fn client_leaving_before_the_head_on_a_mixed_connection_leaves_nothing_in_the_pool() {
    let sandbox = ScriptedSandbox::start(thinking_or_fresh).await;
    let other = always(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nother").await;
    let server = proxy(&[&sandbox, &other], "").await;
    let mut setup = Client::open(server.proxy_addr()).await;
    let a = setup.get("/bind", "lp-1").await;
    assert_eq!(setup.get("/bind", "lp-2").await.status, 200);
    let (session, other_session) = if a.text() == "/bind" {
        ("lp-1", "lp-2")
    } else {
        ("lp-2", "lp-1")
    };
    drop(setup);
    let prelude = format!("GET / HTTP/1.1\r\nhost: a\r\nx-session-id: {other_session}\r\n\r\n");
    leave_before_the_head(&server, &sandbox, prelude.as_bytes(), session).await;
    let mut client = Client::open(server.proxy_addr()).await;
    assert_eq!(client.get("/", other_session).await.text(), "other");
    late_answer_reaches_nobody(&sandbox, &mut client, session).await;
    server.shutdown().await;
}
