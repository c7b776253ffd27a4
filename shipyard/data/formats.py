"""Column layouts of public chat data, turned into the `{"messages": [...]}` records shipyard trains on.

    messages           {"messages": [{"role", "content"}, ...], "tools"?, "chat_template_kwargs"?}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...], "system"?}
    prompt_completion  {"prompt": str | messages, "completion": str | messages}
    alpaca             {"instruction": str, "input"?: str, "output": str, "system"?: str}

`columns` maps a layout's names to the dataset's own (`{messages: conversation}`,
`{prompt: question, completion: answer}`, `{from: role, value: text}` for ShareGPT
turns). `auto` tells the layout from the columns present. A column that is not
there is named together with the columns that are, so a typo is a one-line fix.
"""

from __future__ import annotations

from shipyard.data.messages import EXAMPLE, RecordError
from shipyard.errors import ShipyardError

FORMATS = ("messages", "sharegpt", "prompt_completion", "alpaca")
# The columns that identify each layout, and the optional ones it reads.
REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
            "alpaca": ("instruction", "output")}
OPTIONAL = {"messages": ("tools", "chat_template_kwargs"), "sharegpt": ("system", "from", "value"),
            "prompt_completion": (), "alpaca": ("input", "system")}

ALTERNATIVES = "; ".join(f"{f}: {', '.join(REQUIRED[f])}" for f in FORMATS)

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system", "tool": "tool",
    "observation": "tool", "function_response": "tool",
}


class Layout:
    """How one source's rows become records: a format and the dataset's names for its columns."""

    def __init__(self, fmt: str, columns: dict[str, str], where: str):
        self.format, self.columns, self.where = fmt, dict(columns), where
        known = set(REQUIRED.get(fmt, ())) | set(OPTIONAL.get(fmt, ()))
        if fmt != "auto" and (unknown := sorted(set(columns) - known)):
            raise ShipyardError(f"{where}: columns names {unknown}, which format '{fmt}' does not read; its columns "
                                f"are {sorted(known)}")

    def name(self, column: str) -> str:
        return self.columns.get(column, column)

    def resolve(self, present: list[str]) -> Layout:
        """This layout checked against the columns a source has (the first row's keys for JSONL)."""
        fmt = self.format
        if fmt == "auto":
            fmt = self.detect(present) or self.implied()
            if fmt is None:
                raise ShipyardError(
                    f"{self.where}: cannot tell the data format from its columns {sorted(present)}; expected the "
                    f"columns of one of these formats ({ALTERNATIVES}). Set format: and columns: (e.g. columns: "
                    "{messages: conversation}) to say which column holds what")
        missing = [self.name(c) for c in REQUIRED[fmt] if self.name(c) not in present]
        if missing:
            raise ShipyardError(f"{self.where}: format '{fmt}' reads column(s) {missing}, but the data has "
                                f"{sorted(present)}; name the right ones with columns: (e.g. columns: "
                                f"{{{REQUIRED[fmt][0]}: {sorted(present)[0] if present else 'NAME'}}})")
        return Layout(fmt, self.columns, self.where)

    def implied(self) -> str | None:
        """The format whose column names `columns` renames (columns: {messages: conversation} means messages)."""
        return next((f for f in FORMATS if self.columns and set(self.columns) <= set(REQUIRED[f]) | set(OPTIONAL[f])
                     and set(self.columns) & set(REQUIRED[f])), None)

    def detect(self, present) -> str | None:
        """The first layout whose identifying columns are all in `present`."""
        return next((f for f in FORMATS if all(self.name(c) in present for c in REQUIRED[f])), None)

    def convert(self, row: object) -> dict:
        """The row (a parsed JSON object or a table row) as a messages record; RecordError if it cannot be one."""
        if not isinstance(row, dict):
            raise RecordError(f'expected an object with a "messages" list, e.g. {EXAMPLE}')
        fmt = self.format if self.format != "auto" else self.detect(row)
        if fmt is None:  # a JSONL row of no known layout (tables are checked once, in `resolve`)
            raise RecordError(f'expected an object with a "messages" list, e.g. {EXAMPLE} (or the columns of '
                              f"another format: {ALTERNATIVES}); this row has {sorted(row)}")
        return {"messages": self._messages, "sharegpt": self._sharegpt, "prompt_completion": self._prompt_completion,
                "alpaca": self._alpaca}[fmt](row)

    # ------------------------------------------------------------------ one row

    def _get(self, row: dict, column: str, required: bool = True):
        value = row.get(self.name(column))
        if value is None and required:
            raise RecordError(f'no "{self.name(column)}" in this row (its keys: {sorted(row)})')
        return value

    def _messages(self, row: dict) -> dict:
        if self.columns:  # renamed columns: pass on the record under the names normalise_record reads
            out = {k: v for k, v in row.items() if k not in self.columns.values()}
            for ours in ("messages", "tools", "chat_template_kwargs"):
                if self.name(ours) in row:
                    out[ours] = row[self.name(ours)]
            return out
        return row

    def _sharegpt(self, row: dict) -> dict:
        turns = self._get(row, "conversations")
        if not isinstance(turns, list):
            raise RecordError(f'"{self.name("conversations")}" must be a list of turns, not {type(turns).__name__}')
        role_key, text_key = self.name("from"), self.name("value")
        messages = []
        if system := self._get(row, "system", required=False):
            messages.append({"role": "system", "content": system})
        for n, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise RecordError(f'{self.name("conversations")}[{n}] must be {{"{role_key}": ROLE, "{text_key}": '
                                  f'TEXT}}, not {str(turn)[:80]}')
            role = SHAREGPT_ROLES.get(str(turn[role_key]).lower())
            if role is None:
                raise RecordError(f'{self.name("conversations")}[{n}]: unknown speaker "{turn[role_key]}"; ShareGPT '
                                  f"speakers are {sorted(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": turn[text_key]})
        return {"messages": messages}

    def _prompt_completion(self, row: dict) -> dict:
        prompt, completion = self._get(row, "prompt"), self._get(row, "completion")
        head = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        tail = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return {"messages": [*head, *tail]}

    def _alpaca(self, row: dict) -> dict:
        instruction, output = self._get(row, "instruction"), self._get(row, "output")
        extra = self._get(row, "input", required=False)
        messages = []
        if system := self._get(row, "system", required=False):
            messages.append({"role": "system", "content": system})
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]}
