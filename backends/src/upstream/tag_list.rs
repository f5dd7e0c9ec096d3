//! An origin's tag list, read page by page and kept a short while: a client paging through
//! ferry's list (`n`, `last`), or many clients asking at once, cost the origin one read of
//! the list per repository and credentials in that while, not one per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Deserialize;

use ferry_core::flight::Flights;
use ferry_core::{Error, Repository, Result};

use crate::registry::{RegistryClient, Target};

/// Tags asked for per page of an origin's tag list.
const TAGS_PER_PAGE: usize = 1000;
/// Pages of an origin's tag list read at most.
const MAX_TAG_PAGES: usize = 100;
/// The most of a tag list read, all pages together: a request cannot make ferry hold more.
const MAX_TAG_LIST_SIZE: u64 = 4 << 20;
/// How long a list read from the origin answers again (at most the tag TTL): long enough
/// for a client to page through it, short enough that a tag pushed at the origin shows soon.
const KEEP: Duration = Duration::from_secs(30);
/// Bytes of tag names kept in all (the oldest lists go first past it).
const KEEP_BYTES: usize = 8 << 20;

/// A page of a tag list, as the distribution spec has it (`tags` may be null).
#[derive(Deserialize)]
struct TagPage {
    tags: Option<Vec<String>>,
}

/// A list as read: `None` when the origin does not know the repository.
type List = Option<Arc<Vec<String>>>;

/// Lists read recently, by repository and credentials, and the reads under way.
pub struct TagLists {
    keep: Duration,
    recent: Mutex<HashMap<String, (Instant, List)>>,
    reading: Flights<List>,
}

impl TagLists {
    /// Lists kept for [`KEEP`], or `ttl` when shorter.
    pub fn new(ttl: Duration) -> Self {
        TagLists {
            keep: KEEP.min(ttl),
            recent: Mutex::new(HashMap::new()),
            reading: Flights::default(),
        }
    }

    /// `repo`'s tags at its origin, asked with `authorization`; `key` tells credentials
    /// apart (a list read with one client's credentials answers only that client).
    pub async fn get(
        &self,
        backend: &str,
        client: &Arc<RegistryClient>,
        repo: &Repository,
        authorization: Option<&str>,
        key: &str,
    ) -> Result<List> {
        let key = format!("{repo}:{key}");
        if let Some((at, list)) = self.recent.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            if at.elapsed() < self.keep {
                return Ok(list.clone());
            }
        }
        let (client, repo, authorization) = (client.clone(), repo.clone(), authorization.map(str::to_string));
        let backend_name = backend.to_string();
        let list = self
            .reading
            .run(&key, async move {
                let tags = read(&backend_name, &client, &repo, authorization.as_deref()).await?;
                Ok(tags.map(Arc::new))
            })
            .await?;
        self.keep_list(key, list.clone());
        Ok(list)
    }

    /// Remembers `list`, dropping expired lists and then the oldest past [`KEEP_BYTES`].
    fn keep_list(&self, key: String, list: List) {
        let size = |l: &List| l.as_ref().map_or(0, |t| t.iter().map(String::len).sum::<usize>());
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.retain(|_, (at, _)| at.elapsed() < self.keep);
        let mut held: usize = recent.values().map(|(_, l)| size(l)).sum::<usize>() + size(&list);
        while held > KEEP_BYTES {
            let Some(oldest) = recent.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some((_, l)) = recent.remove(&oldest) {
                held -= size(&l);
            }
        }
        if held <= KEEP_BYTES {
            recent.insert(key, (Instant::now(), list));
        }
    }
}

/// Reads the origin's list, page by page (at most [`MAX_TAG_PAGES`] of [`TAGS_PER_PAGE`]
/// tags, [`MAX_TAG_LIST_SIZE`] in all).
async fn read(
    backend: &str,
    client: &RegistryClient,
    repo: &Repository,
    authorization: Option<&str>,
) -> Result<Option<Vec<String>>> {
    let mut all: Option<Vec<String>> = None;
    let mut last: Option<String> = None;
    let mut budget = MAX_TAG_LIST_SIZE;
    for _ in 0..MAX_TAG_PAGES {
        let target = Target::Tags {
            last: last.as_deref(),
            n: TAGS_PER_PAGE,
        };
        let Some(resp) = client.fetch(Method::GET, repo, target, &[], authorization).await? else {
            return Ok(all);
        };
        let more = resp.headers().contains_key(reqwest::header::LINK);
        let read = super::read_limited(resp, budget, repo, |size| Error::Unavailable {
            backend: backend.to_string(),
            reason: format!("origin {repo} sent a tag list of more than {MAX_TAG_LIST_SIZE} bytes (at least {size})"),
        })
        .await;
        let body = match read {
            Ok(body) => body,
            // Later pages that cannot be read leave the list shorter, not empty.
            Err(e) if all.is_some() => {
                tracing::warn!(backend, origin = %repo, error = %e,
                    "reading the origin's tag list stopped: listing the pages read");
                return Ok(all);
            }
            Err(e) => return Err(e),
        };
        budget -= body.len() as u64;
        let page: TagPage = serde_json::from_slice(&body).map_err(|e| Error::Unavailable {
            backend: backend.to_string(),
            reason: format!("origin {repo} sent a tag list that is not one: {e}"),
        })?;
        let tags = page.tags.unwrap_or_default();
        let next = tags.last().cloned();
        all.get_or_insert_with(Vec::new).extend(tags);
        // The next page starts after this one's last tag; the origin's `Link` only says
        // there is one (its address is not followed: it could name any host).
        match next {
            Some(n) if more && last.as_ref() != Some(&n) => last = Some(n),
            _ => return Ok(all),
        }
    }
    tracing::warn!(backend, origin = %repo, pages = MAX_TAG_PAGES,
        "the origin's tag list is longer than ferry reads: listing its first pages");
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_lists_stay_within_their_bytes_and_expire() {
        let lists = TagLists::new(Duration::from_secs(300));
        let big = |c: char| Some(Arc::new(vec![c.to_string().repeat(3 << 20)]));
        for (i, c) in ['a', 'b', 'c', 'd'].into_iter().enumerate() {
            lists.keep_list(format!("repo{i}"), big(c));
        }
        let recent = lists.recent.lock().unwrap();
        let held: usize = recent.values().map(|(_, l)| l.as_ref().map_or(0, |t| t[0].len())).sum();
        assert!(held <= KEEP_BYTES, "{held}");
        assert!(recent.contains_key("repo3"), "the newest is kept");
        assert!(!recent.contains_key("repo0"), "the oldest went");
        drop(recent);

        let short = TagLists::new(Duration::from_millis(20));
        short.keep_list("r".into(), None);
        std::thread::sleep(Duration::from_millis(30));
        short.keep_list("s".into(), None);
        assert!(!short.recent.lock().unwrap().contains_key("r"), "past the tag TTL");
    }
}
