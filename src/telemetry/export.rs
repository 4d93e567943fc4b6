//! The OTLP/HTTP exporter: protobuf POSTs to `{telemetry.otlp.endpoint}/v1/traces` sent
//! through the activator's own hyper client on its Tokio runtime (the SDK's batch
//! processor runs on its own thread and blocks on each export; it only waits for a task).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};

use crate::config::{ConfigError, TelemetryConfig};

/// Bound on one export request, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read (it is a small protobuf).
const MAX_RESPONSE: usize = 64 * 1024;

/// The tracer provider: batch processor, OTLP exporter, resource, sampler.
pub(super) fn provider(
    config: &TelemetryConfig,
    endpoint: &str,
    sampler: Sampler,
) -> Result<SdkTracerProvider, ConfigError> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let headers: HashMap<String, String> = config.otlp.headers.clone().into_iter().collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_headers(headers)
        .with_http_client(RuntimeClient::new())
        .build()
        .map_err(|e| ConfigError::invalid("telemetry.otlp.endpoint", e.to_string()))?;
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_secs(1))
                .with_max_queue_size(8192)
                .build(),
        )
        .build();
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(
            config
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(sampler)
        .with_resource(resource)
        .build())
}

/// An OTLP HTTP client that runs each request as a task on the activator's runtime.
#[derive(Debug, Clone)]
struct RuntimeClient {
    runtime: tokio::runtime::Handle,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl RuntimeClient {
    fn new() -> RuntimeClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        RuntimeClient {
            runtime: tokio::runtime::Handle::current(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let resp = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request.map(Full::new)))
                .await
                .map_err(|_| "OTLP export timed out".to_owned())?
                .map_err(|e| format!("OTLP export: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("OTLP response: {e}"))?
                .to_bytes();
            Ok::<_, String>(Response::from_parts(parts, body))
        });
        match task.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(msg)) => Err(msg.into()),
            Err(e) => Err(format!("OTLP export task: {e}").into()),
        }
    }
}
