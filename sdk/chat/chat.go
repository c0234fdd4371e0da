// Package chat holds the chat message types shared by the prompt formats:
// harmony (gpt-oss, subpackage harmony) and Jinja chat templates from GGUF
// metadata (subpackage template).
package chat

import "encoding/json"

// Roles.
const (
	RoleSystem    = "system"
	RoleDeveloper = "developer"
	RoleUser      = "user"
	RoleAssistant = "assistant"
	RoleTool      = "tool"
)

// Message is one chat turn, shaped like OpenAI's chat completions API.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
	// Name is the author name; for tool messages the tool's (function's) name.
	Name string `json:"name,omitempty"`
	// ToolCallID links a tool result to the assistant's call.
	ToolCallID string     `json:"tool_call_id,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	// Reasoning is the assistant's chain of thought (reasoning_content).
	Reasoning string `json:"reasoning_content,omitempty"`
}

// ToolCall is a function call made by the assistant.
type ToolCall struct {
	ID        string `json:"id,omitempty"`
	Name      string `json:"name"`
	Arguments string `json:"arguments"` // JSON text
}

// Tool is a function the model may call.
type Tool struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters,omitempty"` // JSON Schema
}
