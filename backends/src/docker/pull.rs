//! Images the engine lacks, pulled through it for a client: with the client's credentials,
//! from registries the origin policy allows, once per image however many ask.

use base64::Engine as _;
use bollard::auth::DockerCredentials;

use std::time::Instant;

use ferry_core::{Error, ImageRef, Repository, RequestCtx, Result, DOCKER_HUB};

use super::{DockerBackend, EngineImage};

impl DockerBackend {
    /// The client's Basic credentials, in the form the engine's pull takes.
    pub(super) fn credentials(ctx: &RequestCtx, repo: &Repository) -> Option<DockerCredentials> {
        let b64 = ctx.authorization.as_deref()?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
        let (user, pass) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        let server = if repo.registry() == DOCKER_HUB {
            "https://index.docker.io/v1/".to_string()
        } else {
            repo.registry().to_string()
        };
        Some(DockerCredentials {
            username: Some(user.to_string()),
            password: Some(pass.to_string()),
            serveraddress: Some(server),
            ..Default::default()
        })
    }

    /// Pulls a missing image through the engine, once however many requests ask for it at
    /// the same time (with the same credentials). Without credentials a failure asks the
    /// client to authenticate (kubelet then retries with its pull secret); with them it is
    /// "not found".
    pub(super) async fn pull(&self, image: &ImageRef, ctx: &RequestCtx) -> Result<bool> {
        let repo = &image.repository;
        let from = if repo.registry() == DOCKER_HUB {
            repo.familiar()
        } else {
            repo.canonical()
        };
        if let Err(reason) = self.may_pull_from(repo.registry()).await {
            tracing::warn!(backend = %self.config.name, image = %image, %reason, "not pulling through the engine");
            return Ok(false);
        }
        let credentials = Self::credentials(ctx, repo);
        let key = format!(
            "{from}:{}\n{}",
            image.reference,
            ctx.authorization.as_deref().unwrap_or("")
        );
        let (engine, index, backend, image) = (
            self.engine.clone(),
            self.index.clone(),
            self.config.name.clone(),
            image.clone(),
        );
        let work = async move {
            let with_credentials = credentials.is_some();
            let started = Instant::now();
            tracing::info!(backend = %backend, image = %image, with_credentials, "pulling missing image through the engine");
            match engine.pull(&from, &image.reference.to_string(), credentials).await? {
                Ok(()) => {
                    ferry_core::metrics::engine_pull(&backend, true);
                    tracing::info!(backend = %backend, image = %image,
                        elapsed_ms = started.elapsed().as_millis() as u64, "pull finished");
                    index.mark_stale();
                    Ok(true)
                }
                Err(message) => {
                    ferry_core::metrics::engine_pull(&backend, false);
                    tracing::warn!(backend = %backend, image = %image, with_credentials, error = %message, "pull failed");
                    // The engine's words stay in the log: they would tell a client which hosts
                    // and ports answer, and how.
                    if with_credentials {
                        Ok(false)
                    } else {
                        Err(Error::Unauthorized {
                            realm: "ferry".into(),
                            message: format!(
                                "{image} is not in the engine and could not be pulled without credentials"
                            ),
                            challenge: None,
                        })
                    }
                }
            }
        };
        self.pulls.run(&key, work).await
    }

    /// Whether the engine may pull from `registry` for a client: the registry must pass the
    /// origin policy, and a name must not resolve to an internal address the policy does not
    /// name (the engine resolves it again itself; this keeps listed names honest).
    pub(super) async fn may_pull_from(&self, registry: &str) -> std::result::Result<(), String> {
        self.origins.check_registry(registry)?;
        let host = if registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            registry
        };
        let (name, _) = ferry_core::origin::split_host(host);
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Ok(()); // an IP literal: check_registry judged it
        }
        if let Ok(addrs) = tokio::net::lookup_host((name, 0)).await {
            for a in addrs {
                self.origins.check_address(registry, a.ip())?;
            }
        }
        Ok(())
    }

    /// Finds an image, pulling it first when it is missing and `pull_missing` is on.
    pub(super) async fn find_or_pull(
        &self,
        names: &[String],
        image: &ImageRef,
        ctx: &RequestCtx,
    ) -> Result<Option<EngineImage>> {
        if let Some(f) = self.find(names).await? {
            return Ok(Some(f));
        }
        if !self.config.pull_missing || !self.pull(image, ctx).await? {
            return Ok(None);
        }
        self.find(names).await
    }
}
