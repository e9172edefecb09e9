//! Polls (`m.poll.*` and the `org.matrix.msc3381.poll.*` forms): the poll as started, and its
//! tally kept as responses arrive, by the counting rules of polls: only each user's latest
//! response (by `origin_server_ts`) counts; responses after the poll's end do not; a response
//! naming an unknown answer is spoiled (the user's vote then counts for nothing); of a valid
//! response only the first `max_selections` answers count.

use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

/// Most answers kept of a poll (clients offer at most 20).
pub const MAX_ANSWERS: usize = 20;
/// Longest question or answer text kept, in characters.
const MAX_TEXT: usize = 300;
/// Longest answer id considered.
const MAX_ANSWER_ID: usize = 100;

/// Event types that start a poll.
pub const START_TYPES: [&str; 2] = ["m.poll.start", "org.matrix.msc3381.poll.start"];
/// Event types that answer a poll.
pub const RESPONSE_TYPES: [&str; 2] = ["m.poll.response", "org.matrix.msc3381.poll.response"];
/// Event types that end a poll.
pub const END_TYPES: [&str; 2] = ["m.poll.end", "org.matrix.msc3381.poll.end"];

/// One answer of a poll and the votes it has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    /// The answer id responses name.
    pub id: String,
    /// The answer's text.
    pub text: String,
    /// Users whose counted response selects this answer.
    pub votes: u64,
}

/// A poll as started, with its current tally.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Poll {
    /// The poll's start event.
    pub event_id: String,
    /// The room it was asked in.
    pub room_id: String,
    /// Who asked.
    pub sender: String,
    /// When it started (`origin_server_ts`, ms).
    pub ts: u64,
    /// `m.disclosed` or `m.undisclosed` (either form).
    pub kind: String,
    /// The question's text.
    pub question: String,
    /// How many answers one response may select.
    pub max_selections: u64,
    /// The answers, in the poll's order, with their votes.
    pub answers: Vec<Answer>,
    /// Users whose counted response selects at least one answer.
    pub voters: u64,
    /// When the poll ended (the end event's `origin_server_ts`), if it has.
    pub ended_ts: Option<u64>,
}

/// A user's latest response to a poll: when, and the answers it counts for (`None`: spoiled).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vote {
    /// The response's `origin_server_ts`.
    pub ts: u64,
    /// The answers counted; `None` when the response was spoiled.
    pub selections: Option<Vec<String>>,
}

fn text_of(value: Option<&JsonValue>) -> String {
    // The stable form is `m.text: [{ body, mimetype? }]`; the unstable one a plain string.
    let text = match value {
        Some(JsonValue::String(text)) => Some(text.as_str()),
        Some(JsonValue::Array(items)) => items
            .iter()
            .find(|i| i.get("mimetype").is_none_or(|m| m == "text/plain"))
            .or_else(|| items.first())
            .and_then(|i| i.get("body"))
            .and_then(|b| b.as_str()),
        _ => None,
    };
    text.unwrap_or_default().chars().take(MAX_TEXT).collect()
}

/// The poll an `m.poll.start` (or unstable) event starts, if its content is a poll.
pub fn parse_start(
    kind: &str,
    content: &JsonValue,
    event_id: &str,
    room_id: &str,
    sender: &str,
    ts: u64,
) -> Option<Poll> {
    let (block, text_key, id_key) = if kind == START_TYPES[0] {
        (content.get("m.poll")?, "m.text", "m.id")
    } else {
        (content.get("org.matrix.msc3381.poll.start")?, "org.matrix.msc1767.text", "id")
    };
    let question = text_of(block.get("question").and_then(|q| q.get(text_key)));
    let answers: Vec<Answer> = block
        .get("answers")?
        .as_array()?
        .iter()
        .filter_map(|answer| {
            let id = answer.get(id_key)?.as_str().filter(|id| id.len() <= MAX_ANSWER_ID)?;
            Some(Answer { id: id.to_owned(), text: text_of(answer.get(text_key)), votes: 0 })
        })
        .take(MAX_ANSWERS)
        .collect();
    if answers.is_empty() {
        return None;
    }
    let max_selections = block.get("max_selections").and_then(|m| m.as_u64()).unwrap_or(1).max(1);
    Some(Poll {
        event_id: event_id.to_owned(),
        room_id: room_id.to_owned(),
        sender: sender.to_owned(),
        ts,
        kind: block.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_owned(),
        question,
        max_selections,
        answers,
        voters: 0,
        ended_ts: None,
    })
}

/// The poll an event responds to or ends (its `m.reference` relation), if any.
pub fn referenced_poll(content: &JsonValue) -> Option<&str> {
    let relates = content.get("m.relates_to")?;
    (relates.get("rel_type")?.as_str()? == "m.reference")
        .then(|| relates.get("event_id")?.as_str())?
}

/// The answer ids a response selects, as sent; `None` when it is no well-formed response.
pub fn response_selections(kind: &str, content: &JsonValue) -> Option<Vec<String>> {
    let list = if kind == RESPONSE_TYPES[0] {
        content.get("m.selections")?
    } else {
        content.get("org.matrix.msc3381.poll.response")?.get("answers")?
    };
    list.as_array()?.iter().take(MAX_ANSWERS * 4).map(|id| id.as_str().map(str::to_owned)).collect()
}

impl Poll {
    /// What a response's `selections` count for: `None` (spoiled) if one names no answer of
    /// the poll, else the first `max_selections` of them, each once.
    pub fn validate(&self, selections: &[String]) -> Option<Vec<String>> {
        if selections.iter().any(|s| !self.answers.iter().any(|a| &a.id == s)) {
            return None;
        }
        let mut counted: Vec<String> = Vec::new();
        for selection in selections.iter().take(self.max_selections as usize) {
            if !counted.contains(selection) {
                counted.push(selection.clone());
            }
        }
        Some(counted)
    }

    /// Whether a response sent at `ts` still counts (not after the end).
    pub fn open_at(&self, ts: u64) -> bool {
        self.ended_ts.is_none_or(|end| ts <= end)
    }

    /// Adds a vote's counted answers to the tally (`add`), or takes them off it.
    pub fn apply(&mut self, vote: &Vote, add: bool) {
        let Some(selections) = vote.selections.as_ref().filter(|s| !s.is_empty()) else {
            return;
        };
        let step = |n: &mut u64| *n = if add { *n + 1 } else { n.saturating_sub(1) };
        step(&mut self.voters);
        for answer in self.answers.iter_mut().filter(|a| selections.contains(&a.id)) {
            step(&mut answer.votes);
        }
    }

    /// Recounts the tally from every user's latest vote (when the poll ends).
    pub fn retally<'a>(&mut self, votes: impl IntoIterator<Item = &'a Vote>) {
        self.voters = 0;
        self.answers.iter_mut().for_each(|a| a.votes = 0);
        for vote in votes {
            if self.open_at(vote.ts) {
                self.apply(vote, true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn poll() -> Poll {
        let content = json!({ "org.matrix.msc3381.poll.start": {
            "question": { "org.matrix.msc1767.text": "Lunch?" },
            "kind": "org.matrix.msc3381.poll.disclosed",
            "max_selections": 2,
            "answers": [
                { "id": "a", "org.matrix.msc1767.text": "Pizza" },
                { "id": "b", "org.matrix.msc1767.text": "Sushi" },
                { "id": "c", "org.matrix.msc1767.text": "Salad" },
            ],
        }});
        parse_start(START_TYPES[1], &content, "$p", "!r:x", "@a:x", 10).unwrap()
    }

    #[test]
    fn unstable_start_parses_and_responses_validate() {
        let poll = poll();
        assert_eq!(poll.question, "Lunch?");
        assert_eq!(poll.answers[1].text, "Sushi");
        let sel = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(poll.validate(&sel(&["a", "a", "c"])), Some(sel(&["a"])));
        assert_eq!(poll.validate(&sel(&["c", "b", "a"])), Some(sel(&["c", "b"])));
        assert_eq!(poll.validate(&sel(&["a", "zzz"])), None);
        assert_eq!(poll.validate(&[]), Some(vec![]));
    }

    #[test]
    fn stable_start_and_response_parse() {
        let content = json!({ "m.poll": {
            "question": { "m.text": [{ "body": "Ship it?" }] },
            "answers": [{ "m.id": "y", "m.text": [{ "body": "Yes" }] }],
        }});
        let poll = parse_start(START_TYPES[0], &content, "$p", "!r:x", "@a:x", 1).unwrap();
        assert_eq!((poll.question.as_str(), poll.max_selections), ("Ship it?", 1));
        let response = json!({ "m.selections": ["y"], "m.relates_to": {
            "rel_type": "m.reference", "event_id": "$p" } });
        assert_eq!(referenced_poll(&response), Some("$p"));
        assert_eq!(response_selections(RESPONSE_TYPES[0], &response), Some(vec!["y".into()]));
    }
}
