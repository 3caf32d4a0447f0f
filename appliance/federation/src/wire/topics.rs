//! MQTT topic names, all under `cosilo/{federation}/`. Ids are validated elsewhere
//! (`[a-z0-9_-]`), so they never contain `/`, `+` or `#`.

/// `cosilo/{fed}/presence/{site}`: heartbeats (QoS 1, retained: the last state of each site).
pub fn presence(fed: &str, site: &str) -> String {
    format!("cosilo/{fed}/presence/{site}")
}
/// `cosilo/{fed}/updates/{site}`: the site's update chunks (QoS 1, not retained).
pub fn updates(fed: &str, site: &str) -> String {
    format!("cosilo/{fed}/updates/{site}")
}
/// `cosilo/{fed}/model/{site}`: the site's latest model announcement (QoS 1, retained).
pub fn model(fed: &str, site: &str) -> String {
    format!("cosilo/{fed}/model/{site}")
}
/// `cosilo/{fed}/control`: tokens, round openings, pulls, leaves (QoS 1, not retained).
pub fn control(fed: &str) -> String {
    format!("cosilo/{fed}/control")
}
/// `cosilo/{fed}/metrics/{site}`: evaluation numbers (QoS 1, not retained).
pub fn metrics(fed: &str, site: &str) -> String {
    format!("cosilo/{fed}/metrics/{site}")
}
/// Filter for every site's presence.
pub fn presence_all(fed: &str) -> String {
    format!("cosilo/{fed}/presence/+")
}
/// Filter for every site's updates.
pub fn updates_all(fed: &str) -> String {
    format!("cosilo/{fed}/updates/+")
}
/// Filter for every site's model announcement.
pub fn model_all(fed: &str) -> String {
    format!("cosilo/{fed}/model/+")
}
/// Filter for every site's metrics.
pub fn metrics_all(fed: &str) -> String {
    format!("cosilo/{fed}/metrics/+")
}
/// Filter for everything in the federation.
pub fn all(fed: &str) -> String {
    format!("cosilo/{fed}/#")
}

/// The filters a member subscribes to: presence, updates, models, control and metrics.
pub fn member_filters(fed: &str) -> Vec<String> {
    vec![
        presence_all(fed),
        updates_all(fed),
        model_all(fed),
        control(fed),
        metrics_all(fed),
    ]
}

/// For a topic of federation `fed`, the channel (`presence`, `updates`, `model`, `control`,
/// `metrics`) and the site it names (None for control). None for anything else.
pub fn parse<'a>(fed: &str, topic: &'a str) -> Option<(&'a str, Option<&'a str>)> {
    let rest = topic
        .strip_prefix("cosilo/")?
        .strip_prefix(fed)?
        .strip_prefix('/')?;
    match rest.split_once('/') {
        None if rest == "control" => Some((rest, None)),
        Some((ch @ ("presence" | "updates" | "model" | "metrics"), site))
            if !site.is_empty() && !site.contains('/') =>
        {
            Some((ch, Some(site)))
        }
        _ => None,
    }
}
