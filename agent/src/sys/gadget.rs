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

/// A loop that runs a table of system calls, for copying into a restored
/// task's scratch page: one ptrace stop for a whole batch instead of one per
/// call. On entry rbx points to the table and r12 holds its length; each
/// entry is eight u64: the call's number, its six arguments, and the slot
/// its result is stored in. The loop stops at the first result in
/// -4095..-1 (an errno), leaving r12 at the number of entries not done
/// (the failed one included), and ends on the int3 at [`BATCH_TRAP`].
///
/// ```text
///  0: test r12, r12          4d 85 e4
///  3: jz 55                  74 32
///  5: mov rax, [rbx]         48 8b 03
///  8: mov rdi, [rbx+8]       48 8b 7b 08
/// 12: mov rsi, [rbx+16]      48 8b 73 10
/// 16: mov rdx, [rbx+24]      48 8b 53 18
/// 20: mov r10, [rbx+32]      4c 8b 53 20
/// 24: mov r8, [rbx+40]       4c 8b 43 28
/// 28: mov r9, [rbx+48]       4c 8b 4b 30
/// 32: syscall                0f 05
/// 34: mov [rbx+56], rax      48 89 43 38
/// 38: cmp rax, -4095         48 3d 01 f0 ff ff
/// 44: jae 55                 73 09
/// 46: add rbx, 64            48 83 c3 40
/// 50: dec r12                49 ff cc
/// 53: jmp 0                  eb c9
/// 55: int3                   cc
/// ```
pub const BATCH_LOOP: [u8; 56] = [
    0x4d, 0x85, 0xe4, 0x74, 0x32, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08, 0x48, 0x8b, 0x73, 0x10,
    0x48, 0x8b, 0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20, 0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30,
    0x0f, 0x05, 0x48, 0x89, 0x43, 0x38, 0x48, 0x3d, 0x01, 0xf0, 0xff, 0xff, 0x73, 0x09, 0x48, 0x83,
    0xc3, 0x40, 0x49, 0xff, 0xcc, 0xeb, 0xc9, 0xcc,
];

/// Offset in [`BATCH_LOOP`] of the instruction after its int3: where a
/// batch stops.
pub const BATCH_TRAP: u64 = 56;

/// Bytes of one entry of a batch's table.
pub const BATCH_ENTRY: usize = 64;
