//! A `syscall` instruction in the agent's own text. A freshly forked child
//! shares this address, so the agent can make it run its first system calls
//! before it has any other code mapped.

use std::arch::global_asm;

global_asm!(
    ".pushsection .text.ckpt_gadget,\"ax\",@progbits",
    ".globl ckpt_syscall_gadget",
    ".type ckpt_syscall_gadget,@function",
    "ckpt_syscall_gadget:",
    "syscall",
    "int3",
    ".popsection",
);

extern "C" {
    fn ckpt_syscall_gadget();
}

/// Machine code of the gadget, for copying into another address space.
pub const SYSCALL_INSN: [u8; 3] = [0x0f, 0x05, 0xcc];

/// Address of the gadget in this process (and in every fork of it).
pub fn syscall_gadget_addr() -> u64 {
    ckpt_syscall_gadget as *const () as usize as u64
}
