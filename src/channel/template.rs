//! Publish rules from the config: channel names templated from the event's row, such as
//! `users/{user_id}`. A template whose field is missing or null names no channel.

use serde_json::Value;

use super::{ChannelPattern, Publisher};
use crate::event::ServiceEvent;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

/// The config's `publish = [...]` as a [`Publisher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplatePublisher {
    templates: Vec<Vec<Part>>,
}

impl TemplatePublisher {
    /// Parses templates; an unclosed `{` or an empty field name is an error naming it.
    pub fn parse(templates: &[String]) -> Result<Self, String> {
        let parsed = templates.iter().map(|t| parse_one(t)).collect::<Result<_, _>>()?;
        Ok(Self { templates: parsed })
    }

    /// The fields the templates read, for checking them against the table.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.templates.iter().flatten().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Text(_) => None,
        })
    }
}

fn parse_one(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("publish template '{template}' has an unclosed '{{'"))?;
        let field = &rest[open + 1..open + close];
        if field.is_empty() {
            return Err(format!("publish template '{template}' has an empty field name"));
        }
        parts.push(Part::Field(field.to_owned()));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

impl Publisher for TemplatePublisher {
    fn reach(&self) -> Vec<ChannelPattern> {
        self.templates
            .iter()
            .map(|template| {
                let mut prefix = String::new();
                for part in template {
                    match part {
                        Part::Text(t) => prefix.push_str(t),
                        Part::Field(_) => return ChannelPattern::Prefix(prefix),
                    }
                }
                ChannelPattern::Exact(prefix)
            })
            .collect()
    }

    fn channels(&self, event: &ServiceEvent) -> Vec<String> {
        let mut out = Vec::with_capacity(self.templates.len());
        'templates: for template in &self.templates {
            let mut name = String::new();
            for part in template {
                match part {
                    Part::Text(t) => name.push_str(t),
                    Part::Field(f) => match event.data.get(f) {
                        Some(Value::String(s)) => name.push_str(s),
                        Some(Value::Number(n)) => name.push_str(&n.to_string()),
                        Some(Value::Bool(b)) => name.push_str(&b.to_string()),
                        _ => continue 'templates,
                    },
                }
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, Position};
    use serde_json::json;
    use std::sync::Arc;

    #[test]
    fn templates_fill_from_the_row_and_skip_missing_fields() {
        let p = TemplatePublisher::parse(&["users/{user_id}".into(), "roles/admin".into(), "rooms/{room}".into()])
            .expect("valid");
        let event = ServiceEvent {
            service: Arc::from("messages"),
            kind: EventKind::Created,
            data: json!({"user_id": 7, "room": null}),
            old: None,
            position: Position { tick: 1, seq: 1 },
            written_us: None,
        };
        assert_eq!(p.channels(&event), ["users/7", "roles/admin"]);
        assert!(TemplatePublisher::parse(&["users/{".into()]).is_err());
    }
}
