//! The dashboard's header says what is true about scaling (issue 26 item 2): with the
//! autoscaler off it says so and where the warm pool size comes from, never "desired 0".

use crate::dashboard::{open_dashboard, start};
use crate::support::HttpClient;

#[tokio::test]
#[cfg_attr(missing_chromium, ignore = "chromium not found (.ci/run installs it)")]
async fn with_the_autoscaler_off_the_header_names_the_warm_pool_source_not_a_desired_count() {
    // `autoscaler.enabled: false`, `backend.warm_pool: 1` (process backend), as in
    // config/local.yaml.
    let (server, dir) = start("scaler-off", "").await;
    let admin = HttpClient::http1(server.admin_addr());
    let ov = admin.get("/api/overview", &[]).await.json();
    assert_eq!(ov["autoscaler"]["enabled"], false, "{ov}");
    assert_eq!(ov["autoscaler"]["warm_pool"]["size"], 1, "{ov}");
    assert_eq!(
        ov["autoscaler"]["warm_pool"]["from"], "backend.warm_pool",
        "{ov}"
    );

    let (_one, browser) = open_dashboard(server.admin_addr()).await;
    browser
        .wait_for(
            "the warm sandbox is counted",
            "(document.querySelector('#sandbox-counts [data-state=warm] b') || {}).textContent === '1'",
        )
        .await;
    let header = browser
        .eval("document.querySelector('#scaler').textContent")
        .await;
    assert_eq!(
        header, "autoscaler off · warm pool 1 from backend.warm_pool · actual 1",
        "the header"
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#scale-title').textContent")
            .await,
        "Sandboxes (autoscaler off)"
    );
    assert_eq!(
        browser
            .eval("document.querySelector('#lg-scale').textContent.includes('desired')")
            .await,
        false,
        "no desired line"
    );
    assert_eq!(browser.errors(), Vec::<String>::new(), "console errors");
    drop(browser);
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
}
