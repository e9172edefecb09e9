//! `/user_directory/search`.

use ruma::api::client::user_directory::search_users::v3 as search_users;

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::user_directory,
};

/// Most results per search.
const MAX_RESULTS: usize = 50;

/// `POST /_matrix/client/v3/user_directory/search`
pub async fn search(
    services: State,
    req: Ruma<search_users::Request>,
) -> Result<search_users::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    if body.search_term.len() > 256 {
        return Err(Error::invalid_param("Search term is too long"));
    }
    let limit = (u64::from(body.limit) as usize).clamp(1, MAX_RESULTS);
    let (hits, limited) =
        user_directory::search(&services, &caller.user_id, &body.search_term, limit)?;
    let results = hits
        .into_iter()
        .map(|hit| {
            let mut user = search_users::User::new(hit.user_id);
            user.display_name = hit.display_name;
            user.avatar_url = hit.avatar_url.map(Into::into);
            user
        })
        .collect();
    Ok(search_users::Response::new(results, limited))
}
