//! A preview URL in a real browser (issue 23): headless Chromium opens the `links` URL the
//! admin API mints (`?preview_token=`), follows the exchange redirect, and ends on the demo
//! sandbox's dev-server page with the token gone from the URL bar, the preview cookie set
//! but invisible to scripts (`HttpOnly`), and the page's WebSocket to its own preview host
//! echoing. `*.localhost` resolves to the loopback inside Chromium, so the preview domain
//! `preview.localhost` needs no DNS. Needs `chromium` (see `dashboard`).

use crate::dashboard::{ONE_BROWSER, cdp::Browser, output_dir};
use crate::support;

use support::{DemoSandbox, HttpClient};

#[tokio::test]
#[cfg_attr(missing_chromium, ignore = "chromium not found (.ci/run installs it)")]
async fn the_browser_exchanges_the_token_for_a_cookie_and_the_preview_websocket_works() {
    let _one = ONE_BROWSER.lock().await;
    let demo = DemoSandbox::start_with_dev().await;
    let dev = demo.dev_addr.expect("a dev port").port();
    let server = support::start(&format!(
        "{}preview: {{domain: preview.localhost, ports: [{dev}], access: token}}\n",
        support::static_backend(&[demo.addr])
    ))
    .await;
    let proxy = HttpClient::http1(server.proxy_addr());
    let admin = HttpClient::http1(server.admin_addr());
    assert_eq!(proxy.get_session("/state", "browse").await.status, 200);
    let minted = admin.call("POST", "/api/sessions/browse/previews").await;
    assert_eq!(minted.status, 201, "{}", minted.text());
    let minted = minted.json();
    let id = minted["preview"].as_str().unwrap().to_owned();
    let token = minted["token"].as_str().unwrap().to_owned();
    let link = minted["links"][dev.to_string()]
        .as_str()
        .unwrap()
        .to_owned();
    let host = format!(
        "{dev}-{id}.preview.localhost:{}",
        server.proxy_addr().port()
    );
    assert_eq!(link, format!("http://{host}/?preview_token={token}"));

    let browser = Browser::launch(&output_dir()).await;
    browser.goto(&link).await;
    browser
        .wait_for(
            "the dev server page on the preview host",
            &format!("location.host === '{host}' && document.title === 'dev server {dev}'"),
        )
        .await;
    assert_eq!(
        browser.eval("location.href").await,
        format!("http://{host}/"),
        "the URL bar no longer shows the token"
    );
    assert_eq!(
        browser.eval("document.cookie").await,
        "",
        "the preview cookie is HttpOnly"
    );
    browser
        .wait_for(
            "the page's WebSocket to echo through the preview",
            &format!(
                "document.querySelector('#ws').textContent === 'websocket: hello from {host}'"
            ),
        )
        .await;
    // A reload rides on the cookie alone.
    browser.goto(&format!("http://{host}/")).await;
    browser
        .wait_for(
            "the page again, by cookie",
            &format!("document.title === 'dev server {dev}'"),
        )
        .await;
    // The same browser without the cookie's host: the other preview host is refused.
    let other = format!(
        "http://{}-{id}.preview.localhost:{}/",
        demo.addr.port(),
        server.proxy_addr().port()
    );
    browser.goto(&other).await;
    browser
        .wait_for(
            "a port outside the allowlist refused",
            "document.body.innerText.includes('preview_port_not_allowed')",
        )
        .await;
    assert!(
        browser.errors().is_empty() || browser.errors().iter().all(|e| e.contains("403")),
        "{:?}",
        browser.errors()
    );
    let metrics = admin.get("/metrics", &[]).await.text();
    let exchanged = "activator_preview_requests_total{result=\"exchanged\"}";
    assert_eq!(support::metric_value(&metrics, exchanged), Some(1.0));
    drop(browser);
    server.shutdown().await;
}
