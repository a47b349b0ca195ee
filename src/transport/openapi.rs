//! `GET /openapi.json`: the REST surface as an OpenAPI 3.0 document, made from the
//! configured services and their catalogs. Row schemas list only what clients can see
//! (never a hidden column: `additionalProperties` is false), request bodies only what
//! clients may write, and every error is Feathers error JSON.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use crate::service::{Method, Service, Services};
use crate::store::{Column, KeyKind};

pub(super) async fn document(State(state): State<AppState>) -> Response {
    axum::Json(describe(&state.services)).into_response()
}

/// The whole document.
pub fn describe(services: &Services) -> Value {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    schemas.insert("Error".into(), error_schema());
    for service in services.all() {
        let name = &*service.name;
        schemas.insert(name.to_owned(), row_schema(service));
        schemas.insert(format!("{name}_create"), write_schema(service, true));
        schemas.insert(format!("{name}_patch"), write_schema(service, false));
        let (collection, item) = service_paths(service);
        paths.insert(format!("/{name}"), collection);
        paths.insert(format!("/{name}/{{id}}"), item);
    }
    if let Some(auth) = services.auth() {
        let users = auth.users_service().to_owned();
        paths.insert(
            "/authentication".into(),
            authentication_path(auth.username_field(), &users),
        );
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "quill",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Feathers-style services over PostgreSQL tables. Queries use Feathers' operators in qs bracket notation (name[$in][0]=a, $sort[id]=-1); only plain equality and $limit/$skip are listed as parameters.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "JWT" } },
        },
    })
}

/// The JSON schema of a column's values, as `row_to_json` writes them.
fn column_schema(column: &Column) -> Value {
    let ty = column.sql_type.as_str();
    let mut schema = match ty.strip_suffix("[]") {
        Some(element) => json!({ "type": "array", "items": scalar_schema(element) }),
        None => scalar_schema(ty),
    };
    if column.nullable
        && let Value::Object(fields) = &mut schema
    {
        fields.insert("nullable".into(), json!(true));
    }
    schema
}

fn scalar_schema(ty: &str) -> Value {
    match ty {
        "smallint" | "integer" | "bigint" => json!({ "type": "integer" }),
        "real" | "double precision" => json!({ "type": "number" }),
        t if t.starts_with("numeric") => json!({ "type": "number" }),
        "boolean" => json!({ "type": "boolean" }),
        "uuid" => json!({ "type": "string", "format": "uuid" }),
        "timestamp with time zone" => json!({ "type": "string", "format": "date-time" }),
        "date" => json!({ "type": "string", "format": "date" }),
        t if t == "text" || t.starts_with("character") || t.starts_with("timestamp") || t.starts_with("time") => {
            json!({ "type": "string" })
        }
        // json, jsonb and anything else: whatever PostgreSQL writes.
        _ => json!({}),
    }
}

/// A row as a reader gets it: visible columns only. Only the id is always there
/// (`$select` and `visible_to` leave the others out).
fn row_schema(service: &Service) -> Value {
    let id = service.table().id().name.clone();
    let properties: Map<String, Value> = service
        .readable_columns()
        .iter()
        .map(|(column, _)| (column.name.clone(), column_schema(column)))
        .collect();
    json!({ "type": "object", "properties": properties, "required": [id], "additionalProperties": false })
}

/// What a client may send: on create, the NOT NULL columns without a default are required.
fn write_schema(service: &Service, create: bool) -> Value {
    let columns = service.writable_columns();
    let mut properties = Map::new();
    let mut required = Vec::new();
    for column in &columns {
        let mut schema = column_schema(column);
        if service.is_hidden(&column.name)
            && let Value::Object(fields) = &mut schema
        {
            // The password: a string, hashed by quill.
            fields.insert("minLength".into(), json!(1));
            fields.insert("maxLength".into(), json!(crate::auth::password::MAX_PASSWORD_BYTES));
            fields.insert("writeOnly".into(), json!(true));
        }
        if let (Some(roles), Value::Object(fields)) = (service.write_roles_of(&column.name), &mut schema) {
            fields.insert(
                "description".into(),
                json!(format!("only {} may set it", roles.join(", "))),
            );
        }
        properties.insert(column.name.clone(), schema);
        if create && !column.nullable && !column.has_default {
            required.push(column.name.clone());
        }
    }
    json!({ "type": "object", "properties": properties, "required": required, "additionalProperties": false })
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "Feathers error JSON",
        "properties": {
            "name": { "type": "string" },
            "message": { "type": "string" },
            "code": { "type": "integer" },
            "className": { "type": "string" },
            "errors": { "type": "object", "additionalProperties": { "type": "string" } },
        },
        "required": ["name", "message", "code", "className"],
    })
}

fn reference(schema: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{schema}") })
}

fn content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

/// Success, plus Feathers errors for every other status.
fn responses(status: &str, description: &str, schema: Value) -> Value {
    json!({
        status: { "description": description, "content": content(schema) },
        "default": { "description": "a Feathers error", "content": content(reference("Error")) },
    })
}

fn operation(
    service: &Service,
    method: Method,
    summary: String,
    mut body: Map<String, Value>,
) -> Option<(String, Value)> {
    if service.is_disabled(method) {
        return None;
    }
    body.insert("summary".into(), json!(summary));
    body.insert(
        "operationId".into(),
        json!(format!("{}_{}", service.name, format!("{method:?}").to_lowercase())),
    );
    body.insert("tags".into(), json!([&*service.name]));
    let security = if service.is_public(method) {
        json!([{}, { "bearer": [] }])
    } else {
        json!([{ "bearer": [] }])
    };
    body.insert("security".into(), security);
    Some((method_verb(method), Value::Object(body)))
}

fn method_verb(method: Method) -> String {
    match method {
        Method::Find | Method::Get => "get",
        Method::Create => "post",
        Method::Update => "put",
        Method::Patch => "patch",
        Method::Remove => "delete",
    }
    .into()
}

/// `/{service}` and `/{service}/{id}`.
fn service_paths(service: &Service) -> (Value, Value) {
    let name = &*service.name;
    let row = reference(name);
    let many = json!({ "type": "array", "items": row });
    let page = match service.page_sizes() {
        Some((_, max)) => json!({
            "type": "object",
            "properties": {
                "total": { "type": "integer" },
                "limit": { "type": "integer", "maximum": max },
                "skip": { "type": "integer" },
                "data": many,
            },
            "required": ["total", "limit", "skip", "data"],
        }),
        None => many.clone(),
    };
    let mut filters: Vec<Value> = service
        .readable_columns()
        .iter()
        .filter(|(_, everywhere)| *everywhere)
        .map(|(column, _)| {
            let mut schema = column_schema(column);
            if let Value::Object(fields) = &mut schema {
                fields.remove("nullable");
            }
            json!({ "name": column.name, "in": "query", "required": false, "schema": schema })
        })
        .collect();
    filters.push(
        json!({ "name": "$limit", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 } }),
    );
    filters.push(
        json!({ "name": "$skip", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 } }),
    );
    let mut collection = Map::new();
    let ops = [
        operation(
            service,
            Method::Find,
            format!("find {name}"),
            obj(json!({
                "parameters": filters,
                "responses": responses("200", "the matching rows", page),
            })),
        ),
        operation(
            service,
            Method::Create,
            format!("create {name}"),
            obj(json!({
                "requestBody": { "required": true, "content": content(reference(&format!("{name}_create"))) },
                "responses": responses("201", "the created row", row.clone()),
            })),
        ),
    ];
    collection.extend(ops.into_iter().flatten());
    for (method, allowed) in [(Method::Patch, "patch"), (Method::Remove, "remove")] {
        if !service.allows_multi(allowed) {
            continue;
        }
        let mut body = obj(json!({
            "parameters": filters,
            "responses": responses("200", "the rows changed", many.clone()),
        }));
        if method == Method::Patch {
            body.insert(
                "requestBody".into(),
                json!({ "required": true, "content": content(reference(&format!("{name}_patch"))) }),
            );
        }
        collection.extend(operation(service, method, format!("{allowed} many {name}"), body));
    }
    let id_schema = match service.table().id().key_kind {
        KeyKind::Integer => json!({ "type": "integer" }),
        KeyKind::Uuid => json!({ "type": "string", "format": "uuid" }),
        KeyKind::Other => json!({ "type": "string" }),
    };
    let mut item = Map::new();
    item.insert(
        "parameters".into(),
        json!([{ "name": "id", "in": "path", "required": true, "schema": id_schema }]),
    );
    let ops = [
        operation(
            service,
            Method::Get,
            format!("get one {name}"),
            obj(json!({
                "responses": responses("200", "the row", row.clone()),
            })),
        ),
        operation(
            service,
            Method::Update,
            format!("replace one {name}"),
            obj(json!({
                "requestBody": { "required": true, "content": content(reference(&format!("{name}_create"))) },
                "responses": responses("200", "the replaced row", row.clone()),
            })),
        ),
        operation(
            service,
            Method::Patch,
            format!("patch one {name}"),
            obj(json!({
                "requestBody": { "required": true, "content": content(reference(&format!("{name}_patch"))) },
                "responses": responses("200", "the patched row", row.clone()),
            })),
        ),
        operation(
            service,
            Method::Remove,
            format!("remove one {name}"),
            obj(json!({
                "responses": responses("200", "the removed row", row),
            })),
        ),
    ];
    item.extend(ops.into_iter().flatten());
    (Value::Object(collection), Value::Object(item))
}

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn authentication_path(username_field: &str, users: &str) -> Value {
    let result = json!({
        "type": "object",
        "properties": {
            "accessToken": { "type": "string" },
            "authentication": { "type": "object" },
            "user": reference(users),
        },
        "required": ["accessToken", "authentication", "user"],
    });
    let local = json!({
        "type": "object",
        "properties": {
            "strategy": { "type": "string", "enum": ["local"] },
            username_field: { "type": "string" },
            "password": { "type": "string", "writeOnly": true },
        },
        "required": ["strategy", username_field, "password"],
    });
    let jwt = json!({
        "type": "object",
        "properties": {
            "strategy": { "type": "string", "enum": ["jwt"] },
            "accessToken": { "type": "string" },
        },
        "required": ["strategy", "accessToken"],
    });
    json!({
        "post": {
            "summary": "log in (local or jwt strategy)",
            "operationId": "authentication_create",
            "tags": ["authentication"],
            "security": [{}],
            "requestBody": { "required": true, "content": content(json!({ "oneOf": [local, jwt] })) },
            "responses": responses("201", "the token and the user", result.clone()),
        },
        "delete": {
            "summary": "log out (confirms the token)",
            "operationId": "authentication_remove",
            "tags": ["authentication"],
            "security": [{ "bearer": [] }],
            "responses": responses("200", "the authentication that ends", result),
        },
    })
}
